"""Forward passes and real tokens per forward pass of the trainer's batches: packed, padded, grouped.

    .venv/bin/python -m bench.padding [--data FILE] [--tokenizer DIR] [--preset qwen3-30b-a3b]

Builds the trainer's own training dataloader over a stage's finished dataset
(`finetune.data`: the one prompt builder, the masks, packing) and
counts, over one epoch on one rank: forward passes, real tokens per forward
pass, the real-token share of processed tokens (padding is the rest) and the
fill of the token budget (micro_batch_size x max_length). Configurations: the
preset's micro-batch, one example per row and packed; micro-batch 8 padded to
the batch maximum (Axolotl's default), length-grouped, and packed.

Default data: the full-scale synthetic mix (26,221 positives x 3 + 96,000
negatives, made with `data_tools synth` + `prepare` in a temporary folder);
`--data` takes the user's own file and `--tokenizer` the real tokenizer, since
the tiny one and the synthetic articles are shorter than real ones. Counting,
not timing: the figures are exact and carry over to the GPU. Appends them to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.prepare import prepare_command, synth_inputs
from bench.results import append_section


def count_batches(cfg, model, tokenizer, rows, dropped: int) -> dict:
    from finetune.data import packed_if_asked
    from finetune.run_plan import decide_here
    from finetune.stages import sft_trainer, stages_for

    data = packed_if_asked(cfg, rows, None, dropped)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = sft_trainer(cfg, stages_for(cfg)[0], Path(tmp), decide_here(cfg, "hf")[0], model, tokenizer, data)
        processed = forwards = 0
        for batch in trainer.get_train_dataloader():
            processed += batch["input_ids"].numel()
            forwards += 1
    real = data.tokens
    return {"forwards": forwards, "examples": data.examples, "real_per_forward": real / forwards,
            "real_share": real / processed, "budget_fill": real / (forwards * cfg.micro_batch_size * cfg.max_length),
            "examples_per_forward": data.examples / forwards}


def full_scale_mix(folder: Path) -> str:
    import subprocess

    synth_inputs(folder)
    subprocess.run(prepare_command(folder, folder), check=True, stdout=subprocess.DEVNULL)
    return str(folder / "hawks_train_curriculum.json")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a training file (default: the full-scale synthetic mix)")
    p.add_argument("--tokenizer", help="a tokenizer folder (default: the tiny model's)")
    p.add_argument("--preset", default="qwen3-30b-a3b", help="micro-batch and max_length from this preset")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from finetune import config as config_mod
    from finetune.data import load_split, token_dataset, tokenising_processes
    from finetune.model import load_base
    from finetune.run_plan import decide_here

    def config(**values):
        overrides = {"model_name": "tiny-moe", "eval_file": "", "dtype": "float32", "load_in_4bit": "false",
                     "packing": "false", **{k: str(v) for k, v in values.items()}}
        return config_mod.resolve("single", args.preset, None, overrides, {}, dry_run=True)

    base = config()
    model, tokenizer = load_base(base, decide_here(base, "hf")[0])  # the dataloader needs a trainer; any model builds one
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or full_scale_mix(Path(tmp))
        records = load_split(data, 0, base.seed)
    micro = base.micro_batch_size
    runs = [(f"micro-batch {micro}, one example per row", config()),
            (f"micro-batch {micro}, packed", config(packing=True)),
            ("micro-batch 8, padded to the batch maximum", config(micro_batch_size=8)),
            ("micro-batch 8, group_by_length", config(micro_batch_size=8, group_by_length=True)),
            ("micro-batch 8, packed", config(micro_batch_size=8, packing=True))]
    tokens, dropped = token_dataset(records, tokenizer, base.max_length,
                                    tokenising_processes(0, len(records)))  # once: the configurations share it
    rows = [(name, count_batches(cfg, model, tokenizer, tokens, dropped)) for name, cfg in runs]
    unpacked = rows[0][1]["forwards"]
    header = ("| configuration | forward passes | vs one per row | examples per forward | real tokens per "
              "forward | real-token share | token budget filled |\n|---|---:|---:|---:|---:|---:|---:|\n")
    table = "".join(f"| {name} | {r['forwards']:,} | {unpacked / r['forwards']:.2f}x fewer | "
                    f"{r['examples_per_forward']:.2f} | {r['real_per_forward']:,.0f} | {r['real_share']:.3f} | "
                    f"{r['budget_fill']:.3f} |\n" for name, r in rows)
    source = f"`{args.data}`" if args.data else "the full-scale synthetic mix (`data_tools synth` + `prepare`)"
    text = (f"{len(records):,} examples of {source}, tokenizer {args.tokenizer or 'of the tiny models'}, "
            f"max_length {base.max_length} (preset {args.preset}), the trainer's own dataloader, one epoch on "
            "one rank; exact counts (no timing). Real-token share: real tokens / tokens the forward processes "
            "(the rest is padding). Token budget: micro-batch x max_length per forward.\n\n")
    print("\n" + text + header + table)
    append_section("padding: forward passes, packed vs not", text + header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
