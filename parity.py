"""Parity harness: compare fine-tuning stacks on the same data with the same metrics.

    python parity.py score --gold GOLD.json --pred PRED.jsonl

`score` applies the metric definitions of callbacks/metrics.py to a file of
predictions (one {"prediction": "..."} per line, in the order of GOLD) and
prints them as one JSON object. The other sub-commands (tokens, evaluate,
compare, run, check-axolotl) arrive with the parity issue.
"""

from __future__ import annotations

import argparse
import json
import sys

from callbacks.metrics import compute_metrics
from data_tools.cli_args import add_fields
from data_tools.records import DataError, gold_offenders, load_records, read_rows


def read_predictions(path: str) -> list[str | None]:
    predictions = []
    for row in read_rows(path):
        if not isinstance(row.value, dict) or "prediction" not in row.value:
            raise DataError(f"{row.location}: expected an object with a \"prediction\" key")
        text = row.value["prediction"]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{row.location}: \"prediction\" must be a string (the model's raw output)")
        predictions.append(text)
    return predictions


def score(args) -> int:
    gold = [gold_offenders(r) for r in load_records(args.gold, args.fields)]
    predictions = read_predictions(args.pred)
    if len(gold) != len(predictions):
        raise DataError(f"{args.gold} has {len(gold)} examples but {args.pred} has {len(predictions)} "
                        "predictions; they must match one to one, in the same order")
    if not gold:
        raise DataError(f"{args.gold}: no examples to score")
    print(json.dumps(compute_metrics(gold, predictions, args.fields), indent=2, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parity.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score a predictions file against gold records")
    p.add_argument("--gold", required=True, help="records file (JSON array or JSONL)")
    p.add_argument("--pred", required=True, help='JSONL, one {"prediction": "..."} per line')
    add_fields(p)
    p.set_defaults(run=score)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
