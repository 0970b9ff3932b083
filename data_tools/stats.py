"""Describe record files: counts, sources, lengths, duplicates and train/val leakage.

With --tokenizer DIR, token lengths are those of the full chat (prompt and
answer, through the tokenizer's own chat template), as the trainer sees them.
"""

from __future__ import annotations

from collections import Counter

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
    from core.prompt import record_messages

    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    # Each distinct record once (the negative-sampled mix repeats every positive: 174,663 records, 122,221
    # distinct): render its chat, then tokenise the texts in batches (what apply_chat_template(tokenize=True)
    # does one by one; the batched fast tokenizer is ~10x quicker on a full-scale file).
    keys = [(r["instruction"], r["input"], r["output"]) for r in records]
    distinct = {key: r for key, r in zip(keys, records)}
    texts = [tokenizer.apply_chat_template(record_messages(r), tokenize=False) for r in distinct.values()]
    length = dict(zip(distinct, map(len, tokenizer(texts, add_special_tokens=False)["input_ids"])))
    return [length[key] for key in keys]


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
    p.add_argument("--tokenizer", help="tokenizer folder for token length percentiles")
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
        info["tokens"] = percentiles(token_lengths(records, args.tokenizer))
    _show(args.file, info)
    if args.val:
        val = load_records(args.val, args.fields)
        train_keys = {article_key(r) for r in records}
        leaked = sum(article_key(r) in train_keys for r in val)
        _show(args.val, describe(val) | {"leaked_from_train": leaked})
        if leaked:
            print(f"warning: {leaked} validation article(s) also occur in {args.file}")
    return 0
