"""`parity.py tokens`: do both stacks train on the same token sequences with the same loss mask?

Ours: the trainer's own data path (config resolution, the one prompt builder,
`finetune.data.stage_data`: masks, max_length truncation, packing). Axolotl's:
its own `load_cfg` + `load_datasets` in its environment (`axolotl_tokens`;
with `sample_packing` Axolotl packs in its batch sampler, after this step, so
its rows are single examples either way). The first N training examples are
compared by position, in file order; with `packing=true` ours are packed
first, cut back into examples at their boundaries and compared as a sorted
list, since packing reorders them.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.records import DataError
from finetune.config_schema import TINY_MODELS
from parity_tools.axolotl_env import axolotl_env, axolotl_python

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Tokenised:
    input_ids: list[int]
    trained: list[bool]

    @classmethod
    def of(cls, input_ids, labels) -> "Tokenised":
        """From a row's input_ids and labels (-100: not trained)."""
        return cls(list(input_ids), [label != -100 for label in labels])


def unpacked(rows) -> list[Tokenised]:
    """The examples inside packed rows (TRL's bfd packing keeps each example's length in seq_lengths)."""
    examples = []
    for row in rows:
        start = 0
        for length in row["seq_lengths"]:
            examples.append(Tokenised.of(row["input_ids"][start:start + length], row["labels"][start:start + length]))
            start += length
    return examples


def our_tokens(config_file: str | None, overrides: list[str], n: int) -> tuple[list[Tokenised], object, object]:
    """The first n examples as our trainer's dataset step tokenises them (packed, then cut back into
    examples, when the config packs); also (cfg, tokenizer)."""
    from finetune import config as config_mod
    from finetune.data import load_split, stage_data
    from finetune.model import load_tokenizer

    cfg = config_mod.resolve("single", None, config_file, config_mod.parse_overrides(overrides), {})
    from data_tools.tiny_data import ensure_tiny_data

    if cfg.preset == "tiny":
        ensure_tiny_data(config_mod.data_files(cfg))
    records = load_split(cfg.train_file, 0, cfg.seed)[:n]
    tokenizer = load_tokenizer(cfg)
    data = stage_data(cfg, records, [], tokenizer)  # the trainer's own dataset step
    if data.dropped:  # compared by position (or sorted), the rest would not line up with Axolotl's
        raise DataError(f"{data.dropped} of the first {len(records)} training examples have no trained token "
                        f"left after max_length {cfg.max_length} cuts them, and our trainer leaves them out: "
                        "compare with a larger max_length (--set max_length=...) or fewer examples (-n)")
    if data.packed:
        return unpacked(data.train), cfg, tokenizer
    return [Tokenised.of(r["input_ids"], r["labels"]) for r in data.train], cfg, tokenizer


def axolotl_tokens(config: str, n: int, base_model_dir: str | None) -> tuple[list[Tokenised], int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tokens.json"
        cmd = [str(axolotl_python()), "-m", "parity_tools.axolotl_tokens", str(Path(config).resolve()), str(n),
               str(out), f"--dataset_prepared_path={Path(tmp) / 'prepared'}"]
        if base_model_dir:
            cmd.append(f"--base_model={base_model_dir}")
        done = subprocess.run(cmd, capture_output=True, text=True, env=axolotl_env())
        if done.returncode != 0:
            raise DataError(f"Axolotl could not tokenise {config} (exit {done.returncode}):\n{done.stderr[-3000:]}")
        data = json.loads(out.read_text())
    return [Tokenised.of(r["input_ids"], r["labels"]) for r in data["rows"]], data["total"]


def first_difference(ours: Tokenised, theirs: Tokenised) -> int | None:
    for i, (a, b) in enumerate(zip(zip(ours.input_ids, ours.trained), zip(theirs.input_ids, theirs.trained))):
        if a != b:
            return i
    if len(ours.input_ids) != len(theirs.input_ids):
        return min(len(ours.input_ids), len(theirs.input_ids))
    return None


def aligned(ours: Tokenised, theirs: Tokenised, tokenizer, at: int, context: int = 12) -> str:
    """Both sequences token by token around the first difference; * marks a trained token."""
    lines = [f"{'pos':>5}  {'ours':<28} {'axolotl':<28}"]
    for i in range(max(0, at - context), min(max(len(ours.input_ids), len(theirs.input_ids)), at + context)):
        cells = []
        for seq in (ours, theirs):
            if i < len(seq.input_ids):
                text = repr(tokenizer.decode([seq.input_ids[i]]))[:22]
                cells.append(f"{'*' if seq.trained[i] else ' '}{seq.input_ids[i]:>6} {text}")
            else:
                cells.append("(end)")
        mark = "  <-- differs" if i == at else ""
        lines.append(f"{i:>5}  {cells[0]:<28} {cells[1]:<28}{mark}")
    return "\n".join(lines)


def offline_model_folder(model_name: str) -> tuple[str | None, str]:
    """(a local stand-in for `model_name`, a line saying so), or (None, "") when its own tokenizer is at hand:
    a Qwen3-family hub id that is neither in the Hugging Face cache nor reachable gets the config this
    repository ships and Qwen3's carried tokenizer (core/qwen3_tokenizer.py); a real one in the cache wins."""
    from transformers import AutoTokenizer

    from core import qwen3_tokenizer
    from finetune.model import shipped_model_config
    from finetune.model_source import hub_reachable

    if model_name in TINY_MODELS or Path(model_name).is_dir():
        return None, ""
    try:
        AutoTokenizer.from_pretrained(model_name, local_files_only=True)
        return None, ""
    except (OSError, ValueError):
        pass
    shipped = shipped_model_config(model_name)
    if hub_reachable() or shipped is None or \
            not json.loads(shipped.read_text(encoding="utf-8")).get("model_type", "").startswith("qwen3"):
        return None, ""
    import transformers

    return str(qwen3_tokenizer.model_folder(shipped, transformers.__version__)), (
        f"tokenizer: Qwen3's own, carried in qwen3_tokenizer/, with {shipped.relative_to(REPO)} ({model_name} is "
        "not in the Hugging Face cache and the hub is unreachable), for both stacks")


def compare_tokens(config_unsloth: str | None, overrides: list[str], config_axolotl: str, n: int) -> tuple[int, str]:
    """(exit code, report): 0 when every compared example is identical."""
    import yaml

    if not Path(config_axolotl).is_file():
        raise DataError(f"--config-axolotl {config_axolotl}: file not found")
    ax_cfg = yaml.safe_load(Path(config_axolotl).read_text(encoding="utf-8")) or {}
    base = ax_cfg.get("base_model")
    stand_in, said = offline_model_folder(base) if base else (None, "")
    if stand_in:  # our side loads the same files when it trains the same model
        from finetune import config as config_mod

        ours_model = config_mod.resolve("single", None, config_unsloth, config_mod.parse_overrides(overrides), {},
                                        dry_run=True).model_name
        overrides = [*overrides, f"model_name={stand_in}"] if ours_model == base else overrides
    ours, cfg, tokenizer = our_tokens(config_unsloth, overrides, n)
    # As the Axolotl launcher does: its `messages` files come from our record files (the tiny set is
    # generated when missing), so a fresh checkout compares without a training run first.
    from data_tools.axolotl_data import dataset_paths, prepare_messages

    prepare_messages(dataset_paths(ax_cfg))
    base_dir = stand_in
    if base in TINY_MODELS:
        from finetune.model import resolve_model_path

        base_dir = resolve_model_path(base)
    theirs, total = axolotl_tokens(config_axolotl, n, base_dir)
    lines = ([said] if said else []) + [f"ours: {cfg.train_file} via qwen_finetune.py's data path; "
                                        f"axolotl: {config_axolotl} ({total:,} examples after its filters)"]
    if cfg.packing:  # packing reorders: compare both sides in one canonical order
        theirs = sorted(theirs[:len(ours)], key=lambda t: (t.input_ids, t.trained))
        ours = sorted(ours, key=lambda t: (t.input_ids, t.trained))
        lines.append(f"ours packed (packing=true, max_length {cfg.max_length}): its {len(ours)} examples cut back "
                     "out of the packed rows, both sides sorted by tokens")
    if len(theirs) < len(ours):
        lines.append(f"Axolotl yielded {len(theirs)} examples, ours {len(ours)}: it dropped some "
                     "(longer than sequence_len?)")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        at = first_difference(a, b)
        if at is not None:
            what = "token ids" if a.input_ids[at:at + 1] != b.input_ids[at:at + 1] else "trained-token mask"
            lines.append(f"example {i}: {what} differ at position {at} (ours {len(a.input_ids)} tokens, "
                         f"{sum(a.trained)} trained; axolotl {len(b.input_ids)} tokens, {sum(b.trained)} trained)")
            lines.append(aligned(a, b, tokenizer, at))
            return 1, "\n".join(lines)
    compared = min(len(ours), len(theirs))
    lines.append(f"identical: input_ids and trained-token masks of all {compared} compared examples "
                 f"({sum(len(a.input_ids) for a in ours[:compared]):,} tokens, "
                 f"{sum(sum(a.trained) for a in ours[:compared]):,} trained)")
    return (0 if compared == len(ours) else 1), "\n".join(lines)
