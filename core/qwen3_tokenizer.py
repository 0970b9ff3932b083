"""Qwen3's own tokenizer, carried in this repository (qwen3_tokenizer/) for offline use.

The vocabulary is shared by the whole Qwen3 family (Qwen3-30B-A3B-Instruct-2507
included). The compressed tokenizer.json is unpacked once into a cache folder,
its checksum checked against the upstream file's, and the folder then loads with
`AutoTokenizer.from_pretrained` like a hub tokenizer. Its chat template is
Instruct-2507's rendering (no thinking block), not the hybrid Qwen3 template the
upstream tokenizer_config.json carries. Pure stdlib.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import tempfile
from pathlib import Path

from core.errors import UserError
from core.prompt import QWEN3_2507_CHAT_TEMPLATE

SOURCE = Path(__file__).resolve().parent.parent / "qwen3_tokenizer"
# sha256 of the upstream, uncompressed tokenizer.json (151,669 tokens; <|im_end|> = 151645)
TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
NAME = "qwen3"  # how a command line names it (--tokenizer qwen3)


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_FINETUNE_CACHE") or Path.home() / ".cache" / "qwen-finetune")


def folder() -> Path:
    """A folder with tokenizer.json and tokenizer_config.json, unpacked and checked on first use."""
    target = cache_root() / f"qwen3-tokenizer-{TOKENIZER_SHA256[:12]}"
    if (target / "tokenizer_config.json").is_file():
        return target
    packed = SOURCE / "tokenizer.json.xz"
    if not packed.is_file():
        raise UserError(f"{packed} is missing: the carried Qwen3 tokenizer is part of the repository "
                        "(git checkout qwen3_tokenizer/)")
    data = lzma.decompress(packed.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise UserError(f"{packed}: unpacks to sha256 {digest}, not the upstream {TOKENIZER_SHA256}: the "
                        "file is damaged; restore it with git checkout qwen3_tokenizer/")
    config = json.loads((SOURCE / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = QWEN3_2507_CHAT_TEMPLATE
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".qwen3-tokenizer-", dir=target.parent))
    (staging / "tokenizer.json").write_bytes(data)
    (staging / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1),
                                                   encoding="utf-8")
    try:
        os.replace(staging, target)  # atomic: another process may have unpacked it meanwhile
    except OSError:
        if not (target / "tokenizer_config.json").is_file():
            raise
    return target


def model_folder(config_file: Path, transformers_version: str) -> Path:
    """A model folder without weights: the carried tokenizer beside `config_file` as config.json, for what
    needs only a model's config and tokenizer offline (Axolotl's dataset preparation, `parity.py tokens`).
    The config records the transformers version writing it: transformers 5 takes a config without one
    for a Mistral checkpoint's and warns that the tokenizer's regex is wrong."""
    import shutil

    settings = json.loads(Path(config_file).read_text(encoding="utf-8"))
    settings.setdefault("transformers_version", transformers_version)
    config = json.dumps(settings, indent=2).encode()
    target = cache_root() / f"qwen3-config-{hashlib.sha256(config).hexdigest()[:12]}-{TOKENIZER_SHA256[:12]}"
    if (target / "config.json").is_file():
        return target
    tokenizer = folder()
    staging = Path(tempfile.mkdtemp(prefix=".qwen3-config-", dir=target.parent))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, staging / name)
    (staging / "config.json").write_bytes(config)
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    return target
