"""Describe record files: counts, sources, lengths, duplicates and train/val leakage.

With --tokenizer DIR (or `qwen3`, the carried Qwen3 tokenizer), token lengths
are those of the full chat (prompt and answer, through the tokenizer's own
chat template), as the trainer sees them, on every record: percentiles, what
--max-length cuts, and examples per packed row (TRL's best-fit-decreasing
packing, as the trainer packs). The dry run reports the same figures on a
sample.
"""

from __future__ import annotations

import random
import time
from collections import Counter

from core.chat_template import prompt_lengths
from core.errors import UserError
from core.prompt import record_messages
from core.records import gold_offenders, load_records
from data_tools import cli_args
from data_tools.split import article_key


def percentiles(values: list[int], qs=(50, 90, 95, 99, 100)) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    return {f"p{q}": ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))] for q in qs}


def token_lengths(records: list[dict], tokenizer) -> list[int]:
    """Tokens of each full chat; `tokenizer` is a tokenizer or its folder."""
    if not records:
        return []  # (a fast tokenizer called on no texts raises IndexError)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    # Each distinct record once (the negative-sampled mix repeats every positive: 174,663 records, 122,221
    # distinct): render its chat, then tokenise the texts in batches (what apply_chat_template(tokenize=True)
    # does one by one; the batched fast tokenizer is ~10x quicker on a full-scale file).
    keys = [(r["instruction"], r["input"], r["output"]) for r in records]
    distinct = {key: r for key, r in zip(keys, records)}
    texts = [tokenizer.apply_chat_template(record_messages(r), tokenize=False) for r in distinct.values()]
    length = dict(zip(distinct, map(len, tokenizer(texts, add_special_tokens=False)["input_ids"])))
    return [length[key] for key in keys]


def length_report(records: list[dict], tokenizer, max_length: int, sample: int | None = 5000) -> dict:
    """Token-length percentiles, how many examples `max_length` would cut and where, and how many examples
    a packed row holds, measured on a sample of `sample` records (None: all of them).

    A cut example loses the end of its answer (and its `<|im_end|>`), which teaches the model not to stop;
    one whose prompt alone is longer has no trained token left and is dropped: reported, never silent."""
    subset = records if not sample or len(records) <= sample else random.Random(0).sample(records, sample)
    lengths = token_lengths(subset, tokenizer)
    over = [i for i, n in enumerate(lengths) if n > max_length]
    prompts = prompt_lengths([subset[i] for i in over], tokenizer) if over else []
    return summarize_lengths(lengths, prompts, max_length, examples=len(records))


def summarize_lengths(lengths: list[int], over_prompt_lengths: list[int], max_length: int, examples: int,
                      packing_sample: int = 5000) -> dict:
    """The report of `length_report` from measured lengths: `lengths` of full chats (a sample of `examples`
    records, or all of them), `over_prompt_lengths` the prompt lengths of those over `max_length` (the
    trainer has both from its one tokenisation: finetune/data.py). Examples per packed row are measured on
    a seeded sample of `packing_sample` lengths."""
    over = sum(n > max_length for n in lengths)
    prompt_over = sum(n >= max_length for n in over_prompt_lengths)
    scale = examples / max(len(lengths), 1)
    packed = lengths if len(lengths) <= packing_sample else random.Random(0).sample(lengths, packing_sample)
    return {"examples": examples, "measured": len(lengths), "tokens": percentiles(lengths),
            "tokens_mean": round(sum(lengths) / max(len(lengths), 1), 1),
            "over_max_length": round(over * scale), "over_share": round(over / max(len(lengths), 1), 4),
            "answer_cut": round((over - prompt_over) * scale), "prompt_over": round(prompt_over * scale),
            "examples_per_row": examples_per_row(packed, max_length), "max_length": max_length}


def examples_per_row(lengths: list[int], max_length: int) -> float:
    """Examples per packed row when these lengths (cut at max_length) are packed best-fit-decreasing, as
    the trainer packs them (TRL's pack_dataset); a sample packs a little looser than the whole set."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    if not lengths:
        return 0.0
    ids = Dataset.from_dict({"input_ids": [[0] * min(n, max_length) for n in lengths]})
    return round(len(lengths) / len(pack_dataset(ids, max_length, "bfd")), 2)


def load_tokenizer(name: str):
    """A tokenizer folder or hub id, or `qwen3`: Qwen3's own tokenizer carried in this repository (no
    download). A Qwen3-family hub id that is neither cached nor reachable gets the carried one, said so."""
    import sys

    from transformers import AutoTokenizer

    from core import qwen3_tokenizer

    if name == qwen3_tokenizer.NAME:
        return AutoTokenizer.from_pretrained(str(qwen3_tokenizer.folder()))
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        if "qwen3" not in name.lower():
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--tokenizer {name}: no tokenizer there ({first}); pass a tokenizer folder, a hub id "
                            "in the Hugging Face cache, or qwen3 (Qwen3's own, carried here)") from None
    print(f"tokenizer: Qwen3's own, carried in qwen3_tokenizer/ ({name} is not in the Hugging Face cache and "
          "the hub is unreachable; the Qwen3 family shares it)", file=sys.stderr)
    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer.folder()))


def describe(records: list[dict]) -> dict:
    offender_counts = [len(gold_offenders(r)) for r in records]
    keys = Counter(article_key(r) for r in records)
    return {
        "records": len(records),
        "positives": sum(c > 0 for c in offender_counts),
        "negatives": sum(c == 0 for c in offender_counts),
        "offenders_per_record": dict(sorted(Counter(offender_counts).items())),
        "sources": dict(Counter(r.get("source", "(none)") for r in records)),
        "article_chars": percentiles([len(r["input"]) for r in records]),
        "duplicate_articles": sum(n - 1 for n in keys.values()),
    }


def add_arguments(p) -> None:
    p.add_argument("file")
    p.add_argument("--val", help="a validation file to check for leakage (same article in both)")
    p.add_argument("--tokenizer", help="tokenizer folder, or 'qwen3' (Qwen3's own, carried in qwen3_tokenizer/), for "
                   "token lengths: percentiles, what --max-length cuts, examples per packed row")
    p.add_argument("--max-length", type=int, default=1536, help="the trainer's max_length (default 1536, the "
                   "production preset's)")
    cli_args.add_fields(p)


def _show(title: str, info: dict) -> None:
    print(title)
    for k, v in info.items():
        print(f"  {k:22} {v}")


def run(args) -> int:
    records = load_records(args.file, args.fields)
    info = describe(records)
    pos, neg = info["positives"], info["negatives"]
    info["positive:negative"] = f"1:{neg / pos:.2f}" if pos else "no positives"
    if args.tokenizer:
        start = time.perf_counter()
        report = length_report(records, load_tokenizer(args.tokenizer), args.max_length, sample=None)
        rows = report["examples"] / report["examples_per_row"] if report["examples_per_row"] else 0
        info |= {"tokens": report["tokens"], "tokens_mean": report["tokens_mean"],
                 f"over {args.max_length} tokens": f"{report['over_max_length']:,} ({report['over_share']:.1%}): "
                 f"{report['answer_cut']:,} lose the end of their answer, {report['prompt_over']:,} dropped "
                 "(prompt alone too long)",
                 "examples_per_packed_row": report["examples_per_row"],
                 "packed_rows_per_epoch": f"~{rows:,.0f} (optimizer steps: rows / (GPUs x micro-batch x "
                 "accumulation); the dry run prints them)",
                 "token_seconds": round(time.perf_counter() - start, 1)}
    _show(args.file, info)
    if args.val:
        val = load_records(args.val, args.fields)
        train_keys = {article_key(r) for r in records}
        leaked = sum(article_key(r) in train_keys for r in val)
        _show(args.val, describe(val) | {"leaked_from_train": leaked})
        if leaked:
            print(f"warning: {leaked} validation article(s) also occur in {args.file}")
    return 0
