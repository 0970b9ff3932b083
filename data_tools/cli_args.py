"""Argument helpers shared by the data_tools commands."""

from __future__ import annotations

import argparse

from core.metrics import DEFAULT_FIELDS

TRAIN_POSITIVES = "data/train/hawks_train.json"
VAL_POSITIVES = "data/train/hawks_val.json"
NEGATIVES = "data/train/person_dummy_2025-12-23-1817.json"
CURRICULUM = "data/train/hawks_train_curriculum.json"
VAL_MIXED = "data/train/hawks_val_mixed.json"
VAL_HARD = "data/train/hawks_val_hard.json"


def fields_list(text: str) -> tuple[str, ...]:
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    if "name" not in fields:
        raise argparse.ArgumentTypeError("the field list must include 'name'")
    return fields


def add_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fields", type=fields_list, default=DEFAULT_FIELDS,
                        help="offender attributes of the output schema, comma-separated "
                             f"(default: {','.join(DEFAULT_FIELDS)})")


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
