"""Parity harness: compare fine-tuning stacks on the same data with the same metrics.

    python parity.py score --gold GOLD.json --pred PRED.jsonl
    python parity.py check-axolotl CONFIG.yml [--model DIR] [--num-gpus 4]
    python parity.py tokens [--config-unsloth CFG.yaml] [--set key=value ...] --config-axolotl CFG.yml [-n 50]
    python parity.py evaluate --base-model DIR [--adapter DIR] --data FILE --out DIR
    python parity.py compare REF.json CAND.json [--tolerance gen_offender_presence_f1=0.02 ...] [--out DIR]
    python parity.py run --preset tiny [--pair axolotl|legacy] [--model tiny-moe|tiny-dense] [--out DIR]

`score` applies the metric definitions of core/metrics.py to a file of
predictions (one {"prediction": "..."} per line, in the order of GOLD) and
prints them as one JSON object.

`check-axolotl` asks Axolotl (in its own environment, see
scripts/setup_axolotl.sh) what it would ignore or get wrong in a config:
unknown keys, invalid chat templates and dataset types, plugins that do not
import, LoRA targets that miss a MoE model's fused experts, DeepSpeed batch
sizes that contradict the config. One line per problem; exit 1 on an error.

`tokens`, `evaluate`, `compare` and `run` are the stack comparison: same
tokens and loss mask, the one shared evaluator, a verdict with tolerances,
and the whole loop on the tiny preset (see parity_tools/ and docs/parity.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from core.errors import UserError
from core.metrics import HEADLINE, compute_metrics, record_context
from core.quiet import silence_known_noise, verbose_requested
from core.records import DataError, gold_offenders, load_records, read_rows
from data_tools.cli_args import add_fields


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
    records = load_records(args.gold, args.fields)
    gold = [gold_offenders(r) for r in records]
    predictions = read_predictions(args.pred)
    if len(gold) != len(predictions):
        raise DataError(f"{args.gold} has {len(gold)} examples but {args.pred} has {len(predictions)} "
                        "predictions; they must match one to one, in the same order")
    if not gold:
        raise DataError(f"{args.gold}: no examples to score")
    print(json.dumps(compute_metrics(gold, predictions, args.fields, **record_context(records)), indent=2,
                     ensure_ascii=False))
    return 0


def check_axolotl(args) -> int:
    from parity_tools.axolotl_check import check
    from parity_tools.axolotl_env import AxolotlMissing

    config = Path(args.config)
    if not config.is_file():
        raise DataError(f"{config}: file not found")
    try:
        problems = check(config, args.model, args.num_gpus)
    except AxolotlMissing as e:
        raise DataError(str(e)) from None
    except yaml.YAMLError as e:
        raise DataError(f"{config}: not valid YAML: {e}") from None
    for p in problems:
        print(p.line(str(config)))
    errors = sum(p.level == "error" for p in problems)
    print(f"{config}: {errors} error(s), {len(problems) - errors} warning(s)")
    return 1 if errors else 0


def tokens(args) -> int:
    from parity_tools.tokens import compare_tokens

    code, report = compare_tokens(args.config_unsloth, args.set, args.config_axolotl, args.n)
    print(report)
    return code


def evaluate(args) -> int:
    from parity_tools.evaluate import evaluate as run_evaluation

    metrics = run_evaluation(args.base_model, args.adapter, args.data, Path(args.out),
                             max_samples=args.max_samples, seed=args.seed, batch_size=args.batch_size,
                             dtype=args.dtype)
    print(", ".join(f"{k} {metrics[k]:.3f}" for k in HEADLINE if k in metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'predictions.jsonl'} and "
          f"{Path(args.out) / 'errors.md'} "
          f"({metrics['gen_num_examples']} examples)")
    return 0


def compare(args) -> int:
    from parity_tools import compare as cmp

    ref, cand = cmp.load_metrics(args.ref), cmp.load_metrics(args.cand)
    rows = cmp.compare(ref, cand, cmp.parse_tolerances(args.tolerance))
    names = (args.ref_name, args.cand_name)
    errors = cmp.error_table(ref, cand, *names)
    print(cmp.table(rows, *names) + (f"\n\n{errors}" if errors else ""))
    written = cmp.write_report(Path(args.out), rows, names, (args.ref, args.cand),
                               (cmp.losses_of(args.ref_summary), cmp.losses_of(args.cand_summary)),
                               errors=errors)
    failed = [r.name for r in rows if r.failed]
    print(f"\n{'FAIL' if failed else 'PASS'}: {args.cand_name} vs {args.ref_name}"
          + (f": worse beyond tolerance on {', '.join(failed)}" if failed else ", every gated metric within tolerance")
          + f"; report: {written[0]}")
    return 1 if failed else 0


def run_pair(args) -> int:
    from parity_tools.run import run

    return run(args.preset, args.pair, Path(args.out or f"outputs/parity_{args.pair}"), args.max_steps,
               args.eval_samples, args.max_train_samples, args.model, args.router_aux_loss_coef)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parity.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show the known harmless library messages too")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score a predictions file against gold records")
    p.add_argument("--gold", required=True, help="records file (JSON array or JSONL)")
    p.add_argument("--pred", required=True, help='JSONL, one {"prediction": "..."} per line')
    add_fields(p)
    p.set_defaults(run=score)
    p = sub.add_parser("check-axolotl", help="find what Axolotl would ignore or get wrong in a config")
    p.add_argument("config", help="Axolotl YAML config")
    p.add_argument("--model", help="local model folder (config.json) to check LoRA targets against; "
                                   "default: base_model when local, or a config this repository ships")
    p.add_argument("--num-gpus", type=int, default=4, help="processes for the DeepSpeed batch arithmetic")
    p.set_defaults(run=check_axolotl)
    p = sub.add_parser("tokens", help="check both stacks tokenise and mask the training data identically")
    p.add_argument("--config-unsloth", help="qwen_finetune.py YAML config (default: the tiny preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="qwen_finetune.py config override (repeatable)")
    p.add_argument("--config-axolotl", default="axolotl_configs/tiny_cpu.yml")
    p.add_argument("-n", type=int, default=50, help="first N training examples (default 50)")
    p.set_defaults(run=tokens)
    p = sub.add_parser("evaluate", help="the shared generation evaluator on a base model + adapter")
    p.add_argument("--base-model", required=True, help="model folder or hub id; tiny-dense / tiny-moe")
    p.add_argument("--adapter", help="PEFT adapter folder (ours or Axolotl's); omit for the base model")
    p.add_argument("--data", required=True, help="records or messages file (JSON/JSONL)")
    p.add_argument("--out", required=True, help="folder for metrics.json and predictions.jsonl")
    p.add_argument("--max-samples", type=int, default=0, help="seeded subset size (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.set_defaults(run=evaluate)
    p = sub.add_parser("compare", help="compare two runs' gen_* metrics; exit 1 when the candidate is worse")
    p.add_argument("ref", help="reference metrics JSON (parity.py evaluate, gen_metrics_step*.json, run_summary.json)")
    p.add_argument("cand", help="candidate metrics JSON")
    p.add_argument("--tolerance", action="append", default=[], metavar="METRIC=ABS",
                   help="allowed absolute worsening (default 0.02 for the headline metrics)")
    p.add_argument("--out", default=".", help="folder for parity_report.md and the charts")
    p.add_argument("--ref-name", default="reference")
    p.add_argument("--cand-name", default="candidate")
    p.add_argument("--ref-summary", help="run_summary.json of the reference run (loss curve)")
    p.add_argument("--cand-summary", help="run_summary.json of the candidate run (loss curve)")
    p.set_defaults(run=compare)
    p = sub.add_parser("run", help="train both stacks on the tiny preset, evaluate both, compare")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--pair", choices=("axolotl", "legacy"), default="axolotl",
                   help="axolotl: qwen_finetune.py vs Axolotl; legacy: two-stage vs qwen_finetune_legacy.py")
    p.add_argument("--out", help="output folder (default outputs/parity_<pair>)")
    p.add_argument("--model", default="", help="tiny-dense or tiny-moe (default: the tiny preset's model)")
    p.add_argument("--router-aux-loss-coef", type=float, default=0.0,
                   help="MoE router load-balancing loss weight, the same for both stacks (default 0 = off)")
    p.add_argument("--max-steps", type=int, default=0, help="cap the optimizer steps (0 = the preset's epochs)")
    p.add_argument("--eval-samples", type=int, default=100, help="validation records scored (seeded sample)")
    p.add_argument("--max-train-samples", type=int, default=64,
                   help="legacy pair: training examples per stage (its recipe is micro-batch 1 x 16)")
    p.set_defaults(run=run_pair)
    args = parser.parse_args(argv)
    silence_known_noise(args.verbose or verbose_requested(None))
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
