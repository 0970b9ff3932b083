"""`qwen_finetune.py export`: a trained adapter as something to serve.

    python qwen_finetune.py export --adapter outputs/tiny/single/adapter --out exported/ --merge

`--merge` writes one standalone model (base + adapter merged, PEFT's
`merge_and_unload`, fused MoE experts included) with its tokenizer, loadable
with `from_pretrained`. It is saved in the base checkpoint's dtype; an adapter
trained on the 4-bit base is merged into the 16-bit base (bf16), which is
close to, not bit-equal with, what the 4-bit model + adapter computed.
Without `--merge` the adapter is copied with the tokenizer, its
`base_model_name_or_path` pointing at the base (for LoRA-serving engines).

The base is `--base`, else `model_name` of the run's `config.yaml` beside the
adapter, else the adapter's own `base_model_name_or_path`. The output is
written to a temporary folder and renamed, so it is never half-written. It
holds a model card (README.md, finetune/model_card.py: base, data hashes,
settings, the validation metrics of the exported step, intended use, licence).

`--push-to-hub OWNER/NAME` then uploads the folder with huggingface_hub
(token: $HF_TOKEN or a saved `hf auth login`; never printed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from core.errors import UserError
from core.records import replace_dir
from core.redact import redact_text
from finetune.config import ConfigError
from finetune.model_card import model_card


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{prog} export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter folder (a stage's adapter/)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    p.add_argument("--base", help="base model (hub id or folder); default: the run's model_name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code")
    p.add_argument("--license", default="apache-2.0", help="licence id for the model card (default: apache-2.0, "
                   "Qwen3's; the base model's terms apply either way)")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the exported folder to this Hub repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    return p


def run_info(adapter: Path) -> dict:
    """The training run's config.yaml beside the adapter ({} when absent)."""
    import yaml

    path = adapter.parent / "config.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def resolve_base(adapter: Path, base: str | None, info: dict) -> str:
    from finetune.model import resolve_model_path

    if base:
        return resolve_model_path(base)
    if info.get("model_name"):
        return resolve_model_path(info["model_name"])
    name = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not name:
        raise ConfigError(f"{adapter}: cannot tell the base model (no config.yaml beside it, no "
                          "base_model_name_or_path); pass --base")
    return name


def check_paths(adapter: Path, out: Path, overwrite: bool) -> None:
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json); pass a stage's "
                          "adapter/ folder, e.g. outputs/tiny/single/adapter")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    if out.resolve() == adapter.resolve() or adapter.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} must not be the adapter folder or inside it")


def merged_model(base: str, adapter: Path, info: dict, trust_remote_code: bool):
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise ConfigError(f"{base} is a quantized checkpoint; merging needs the 16-bit base weights. "
                          "Pass --base with the unquantized model (e.g. Qwen/Qwen3-30B-A3B-Instruct-2507)")
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    notes = []
    if info.get("load_in_4bit"):
        dtype = torch.bfloat16
        notes.append("the adapter was trained on the 4-bit (NF4) base and is merged into the bf16 base: "
                     "answers can differ slightly from the 4-bit model + adapter")
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    model = PeftModel.from_pretrained(model, str(adapter))
    return model.merge_and_unload(), dtype, notes


def export(adapter: Path, out: Path, merge: bool, base: str | None, overwrite: bool,
           trust_remote_code: bool, license_id: str = "apache-2.0") -> int:
    from transformers import AutoTokenizer

    check_paths(adapter, out, overwrite)
    info = run_info(adapter)
    base_path = resolve_base(adapter, base, info)
    tokenizer_from = adapter if (adapter / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from), trust_remote_code=trust_remote_code)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if merge:
            print(f"merging {adapter} into {base_path} ...", flush=True)
            model, dtype, notes = merged_model(base_path, adapter, info, trust_remote_code or
                                               bool(info.get("trust_remote_code")))
            model.save_pretrained(str(tmp))
            what = f"merged model ({str(dtype).replace('torch.', '')}, " \
                   f"{sum(p.numel() for p in model.parameters()):,} parameters)"
        else:
            for f in adapter.iterdir():
                if f.name.startswith("adapter_"):
                    shutil.copy2(f, tmp / f.name)
            config = json.loads((tmp / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = base_path
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
            what, notes = "adapter (not merged; pass --merge for a standalone model)", []
        tokenizer.save_pretrained(str(tmp))
        card_base = base or info.get("model_name") or base_path  # the hub id the run named, not a local path
        (tmp / "README.md").write_text(model_card(adapter, card_base, merge, license_id, info), encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"\n=== export ===\nwrote {what} + tokenizer + model card to {out} ({size / 2**20:,.1f} MiB)\n"
          f"base: {base_path}\nadapter: {adapter}")
    for note in notes:
        print(f"note: {note}")
    return 0


def push_to_hub(folder: Path, repo: str, private: bool) -> None:
    from huggingface_hub import HfApi

    api = HfApi()  # the token comes from $HF_TOKEN or the saved login, read by huggingface_hub itself
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="qwen-finetune export")
    except Exception as e:  # network, auth, offline mode, a bad repo id: the export itself is done
        raise ConfigError(f"push to the Hub repository {repo} failed ({type(e).__name__}: "
                          f"{redact_text(str(e).strip().splitlines()[0] if str(e).strip() else '')}); the export is "
                          f"complete in {folder}: set HF_TOKEN (a write token) and run the export again with "
                          "--overwrite --push-to-hub, or upload the folder with `hf upload`") from None
    print(f"pushed {folder} to https://huggingface.co/{repo}")


def main(argv: list[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.private and not args.push_to_hub:
            raise ConfigError("--private goes with --push-to-hub OWNER/NAME")
        code = export(Path(args.adapter), Path(args.out), args.merge, args.base, args.overwrite,
                      args.trust_remote_code, args.license)
        if args.push_to_hub:
            push_to_hub(Path(args.out), args.push_to_hub, args.private)
        return code
    except (UserError, OSError) as e:  # a malformed run file, a base or adapter that does not load: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
