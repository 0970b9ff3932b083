"""Split one record file into train and validation, with no article in both.

Each record goes to a side by a seeded hash of its normalised article text, so
duplicates of one article always land together and the split is the same on
every run and machine.
"""

from __future__ import annotations

import hashlib

from core.metrics import normalize_name
from core.records import DataError, load_records, refuse_overwrite, write_rows
from data_tools import cli_args


def article_key(record: dict) -> str:
    return normalize_name(record["input"])


def goes_to_val(record: dict, val_fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}\0{article_key(record)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    for r in records:
        (val if goes_to_val(r, val_fraction, seed) else train).append(r)
    return train, val


def add_arguments(p) -> None:
    p.add_argument("input")
    p.add_argument("--train", required=True, help="output file for the training side")
    p.add_argument("--val", required=True, help="output file for the validation side")
    p.add_argument("--val-fraction", type=float, default=0.1, help="expected share of validation (default: 0.1)")
    p.add_argument("--seed", type=int, default=42)
    cli_args.add_fields(p)
    cli_args.add_force(p)


def run(args) -> int:
    if not 0 < args.val_fraction < 1:
        raise DataError("--val-fraction must be between 0 and 1")
    refuse_overwrite([args.train, args.val], args.force)
    records = load_records(args.input, args.fields)
    train, val = split_records(records, args.val_fraction, args.seed)
    write_rows(args.train, train)
    write_rows(args.val, val)
    print(f"split {len(records):,} records: {len(train):,} train -> {args.train}, "
          f"{len(val):,} val ({len(val) / max(len(records), 1):.1%}) -> {args.val}")
    return 0
