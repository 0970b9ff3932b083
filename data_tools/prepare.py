"""Merge positives and negatives into one shuffled training set (negative sampling).

Training set: the positives repeated --repeat times plus the first
--num-negatives negatives, shuffled with --seed, every record tagged with its
``source`` (positive / negative) so metrics can be split by source.

Validation set: the user's validation positives alone make presence F1 and the
hallucination rate meaningless, so the negatives *after* the first
--num-negatives (never trained on) are added until they are --val-negative-share
of the validation set.
"""

from __future__ import annotations

import random
import time

from core.records import DataError, is_positive, load_records, refuse_overwrite, write_rows
from data_tools import cli_args


def add_arguments(p) -> None:
    p.add_argument("--positives", default=cli_args.TRAIN_POSITIVES)
    p.add_argument("--negatives", default=cli_args.NEGATIVES)
    p.add_argument("--val", default=cli_args.VAL_POSITIVES, help="validation positives")
    p.add_argument("--out", default=cli_args.CURRICULUM, help="merged training set (.json or .jsonl)")
    p.add_argument("--val-out", default=cli_args.VAL_MIXED, help="validation set with held-out negatives")
    p.add_argument("--repeat", type=int, default=3, help="times each positive is repeated (default: 3)")
    p.add_argument("--num-negatives", type=int, default=96_000,
                   help="negatives taken for training, from the start of the file (default: 96,000)")
    p.add_argument("--val-negative-share", type=float, default=0.5,
                   help="share of negatives in the validation set (default: 0.5)")
    p.add_argument("--seed", type=int, default=42)
    cli_args.add_fields(p)
    cli_args.add_force(p)


def tag(records: list[dict], source: str) -> list[dict]:
    return [{**r, "source": source} for r in records]


def merge(positives: list[dict], negatives: list[dict], repeat: int, num_negatives: int,
          seed: int) -> list[dict]:
    merged = tag(positives, "positive") * repeat + tag(negatives[:num_negatives], "negative")
    random.Random(seed).shuffle(merged)
    return merged


def validation_mix(val_positives: list[dict], spare_negatives: list[dict], negative_share: float,
                   seed: int) -> list[dict]:
    """Positives plus enough held-out negatives for the requested share (or all there are)."""
    wanted = round(len(val_positives) * negative_share / (1 - negative_share)) if negative_share < 1 else len(spare_negatives)
    mixed = tag(val_positives, "positive") + tag(spare_negatives[:wanted], "negative")
    random.Random(seed).shuffle(mixed)
    return mixed


def run(args) -> int:
    if args.repeat < 1:
        raise DataError("--repeat must be at least 1")
    if not 0 <= args.val_negative_share < 1:
        raise DataError("--val-negative-share must be in [0, 1)")
    refuse_overwrite([args.out, args.val_out], args.force)
    start = time.perf_counter()
    positives = load_records(args.positives, args.fields)
    negatives = load_records(args.negatives, args.fields)
    val_positives = load_records(args.val, args.fields)

    odd_pos = sum(not is_positive(r) for r in positives)
    odd_neg = sum(is_positive(r) for r in negatives)
    if odd_pos:
        print(f"warning: {odd_pos} record(s) in {args.positives} have no offenders; kept, tagged positive")
    if odd_neg:
        print(f"warning: {odd_neg} record(s) in {args.negatives} name offenders; kept, tagged negative")
    if len(negatives) < args.num_negatives:
        print(f"warning: {args.negatives} has {len(negatives):,} records, fewer than "
              f"--num-negatives {args.num_negatives:,}; all are used for training")

    train = merge(positives, negatives, args.repeat, args.num_negatives, args.seed)
    spare = negatives[args.num_negatives:]
    val = validation_mix(val_positives, spare, args.val_negative_share, args.seed)
    val_negatives = len(val) - len(val_positives)
    write_rows(args.out, train)
    write_rows(args.val_out, val)

    n_pos = len(positives) * args.repeat
    n_neg = len(train) - n_pos
    print(f"train: {len(positives):,} positives x {args.repeat} = {n_pos:,} + {n_neg:,} negatives "
          f"= {len(train):,} records (positive:negative = 1:{n_neg / max(n_pos, 1):.2f}) -> {args.out}")
    print(f"val:   {len(val_positives):,} positives + {val_negatives:,} held-out negatives "
          f"= {len(val):,} records -> {args.val_out}")
    unused = len(spare) - val_negatives
    if unused > 0:
        print(f"note:  {unused:,} negatives after the first {args.num_negatives:,} were used for neither")
    if args.val_negative_share > 0 and val_negatives == 0:
        print("warning: no negatives were left for validation (all went to training); presence F1 "
              "and the hallucination rate will be meaningless. Lower --num-negatives or add negatives.")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0
