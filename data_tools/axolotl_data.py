"""Write the `messages` files an Axolotl config reads, from our record files.

For every `datasets` / `test_datasets` path ending in `.messages.jsonl` that
does not exist, converts the record file beside it (same name, `.json`): the
tiny data set is generated when missing; real data must come from `prepare`.
Existing files are left alone.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from core.records import DEFAULT_FIELDS, DataError, read_rows, write_rows
from core.formats import convert_rows
from data_tools.tiny_data import ensure_tiny_data

SUFFIX = ".messages.jsonl"
# The tiny preset's record files (finetune/config.py), by what they hold.
TINY_FILES = {"hawks_train_curriculum.json": "train_file", "hawks_val_mixed.json": "eval_file",
              "hawks_train.json": "stage1_train_file"}


def dataset_paths(config: dict) -> list[str]:
    return [ds["path"] for key in ("datasets", "test_datasets") for ds in config.get(key) or []
            if isinstance(ds, dict) and isinstance(ds.get("path"), str)]


def prepare_messages(paths: list[str]) -> list[str]:
    """Make each missing …/X.messages.jsonl from …/X.json; returns what was done."""
    todo = []
    for path in paths:
        target = Path(path)
        if not target.exists() and target.name.endswith(SUFFIX):
            todo.append((target.with_name(target.name[:-len(SUFFIX)] + ".json"), target))
    tiny = {TINY_FILES[src.name]: str(src) for src, _ in todo
            if not src.is_file() and src.parent.parts[-2:] == ("data", "tiny") and src.name in TINY_FILES}
    if tiny:
        ensure_tiny_data(tiny)
    done = []
    for source, target in todo:
        if not source.is_file():
            raise DataError(f"{target} is missing and so is its record file {source}: create it with "
                            "`python -m data_tools prepare` (docs/data.md), or point the config at your data")
        rows = convert_rows(read_rows(source), "auto", "messages", DEFAULT_FIELDS)
        write_rows(target, rows)
        done.append(f"{source} -> {target} ({len(rows):,} records)")
    return done


def add_arguments(p) -> None:
    p.add_argument("config", help="Axolotl YAML config")


def run(args) -> int:
    try:
        config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{args.config}: cannot read the config: {e}") from None
    done = prepare_messages(dataset_paths(config))
    for line in done:
        print(f"prepared {line}")
    if not done:
        print(f"every data file of {args.config} exists")
    return 0
