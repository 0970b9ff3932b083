"""Padding waste of the trainer's batches: the share of processed tokens that are real.

    .venv/bin/python -m bench.padding [--data data/tiny/hawks_train_curriculum.json] [--micro-batch 8 16]

Builds the trainer's own training dataloader (config, prompt builder, TRL
preprocessing and collator, via `finetune.stages.sft_trainer`) over the
negative-sampled mix and counts, over one epoch of batches, real tokens
(attention mask) against processed tokens (batch x padded length), for
plain random batches padded to the batch maximum (the default, and what
Axolotl does) and for `group_by_length=true` (length-grouped batches).
Counting, not timing: the figures are exact and need no repetition.
Appends them to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bench.results import append_section


def real_share(cfg, model, tokenizer, records) -> tuple[float, int]:
    from finetune.stages import sft_trainer, stages_for

    with tempfile.TemporaryDirectory() as tmp:
        trainer = sft_trainer(cfg, stages_for(cfg)[0], Path(tmp), model, tokenizer, records, [])
        real = processed = batches = 0
        for batch in trainer.get_train_dataloader():
            real += int(batch["attention_mask"].sum())
            processed += batch["input_ids"].numel()
            batches += 1
    return real / processed, batches


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/tiny/hawks_train_curriculum.json")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[8, 16])
    args = p.parse_args()

    from data_tools.tiny_data import ensure_tiny_data
    from finetune import config as config_mod
    from finetune.data import load_split
    from finetune.model import load_base

    if args.data.startswith("data/tiny/"):
        ensure_tiny_data({"train_file": args.data})
    base = config_mod.resolve("single", "tiny", None, {"train_file": args.data, "eval_file": ""}, {})
    model, tokenizer = load_base(base, "hf")
    records = load_split(args.data, 0, base.seed)
    rows = []
    for micro in args.micro_batch:
        shares = {}
        for grouped in (False, True):
            cfg = config_mod.resolve("single", "tiny", None, {"train_file": args.data, "eval_file": "",
                                                                "micro_batch_size": str(micro),
                                                                "group_by_length": str(grouped)}, {})
            shares[grouped], batches = real_share(cfg, model, tokenizer, records)
        rows.append((micro, batches, shares[False], shares[True]))
    print(f"\n{len(records):,} examples of {args.data}, max_length {base.max_length}")
    print(f"{'micro-batch':>11} {'batches':>8} {'plain padding':>14} {'group_by_length':>16}")
    for micro, batches, plain, grouped in rows:
        print(f"{micro:>11} {batches:>8} {plain:>14.3f} {grouped:>16.3f}")
    append_section("padding: real-token share of processed tokens",
                   f"{len(records):,} examples of `{args.data}` (the negative-sampled mix), the trainer's own "
                   f"dataloader, one epoch; exact counts (no timing).\n\n"
                   "| micro-batch | batches | plain random batches | `group_by_length=true` (target >= 0.9) |\n"
                   "|---:|---:|---:|---:|\n"
                   + "".join(f"| {m} | {b} | {p:.3f} | **{g:.3f}** |\n" for m, b, p, g in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
