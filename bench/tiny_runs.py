"""The measured runs on the tiny preset quoted in the README and docs/parity.md, recorded in bench/RESULTS.md.

    .venv/bin/python -m bench.tiny_runs [--only demo|parity]

- demo: the README's first command (`bash scripts/demo.sh`, the tiny MoE) and the same with
  `model_name=tiny-dense`: wall time end to end, training time, the final generation metrics and the
  step adapter/ keeps (best_metric).
- parity: `parity.py run --preset tiny` (ours vs Axolotl): the headline table, training times and
  the total.

Each run writes into a temporary folder; nothing in outputs/ is touched. `python -m bench.readme_figures`
then checks the quoted figures against these sections. About 9 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import append_section
from core.metrics import HEADLINE

REPO = Path(__file__).resolve().parent.parent
DEMO_MODELS = ("tiny-moe", "tiny-dense")


def timed(cmd: list[str], log: Path) -> float:
    print(f"[tiny_runs] {' '.join(cmd)} (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"[tiny_runs] failed (exit {done.returncode}); the end of {log}:\n"
                 + log.read_text(encoding="utf-8", errors="replace")[-3000:])
    return time.perf_counter() - start


def metric_cells(metrics: dict) -> str:
    return " | ".join(f"{metrics[k]:.3f}" for k in HEADLINE)


def demo(tmp: Path) -> str:
    rows = []
    for model in DEMO_MODELS:
        out = tmp / model
        wall = timed(["bash", "scripts/demo.sh", "--overwrite", f"output_dir={out}", f"model_name={model}"],
                     tmp / f"{model}.log")
        s = json.loads((out / "single" / "run_summary.json").read_text(encoding="utf-8"))
        best = s["best"]
        rows.append(f"| {model} | {s['backend']} | {wall:.0f} | {s['train_seconds']:.0f} | {s['global_step']} "
                    f"| {metric_cells(s['metrics'])} | {best['adapter_step']} | {best['value']:.4f} "
                    f"| {best['last_value']:.4f} |")
    return ("`bash scripts/demo.sh` (the tiny preset, `single` mode, generation eval every 100 steps, micro-batch 8), "
            "and the same with `model_name=tiny-dense`; final generation eval on 100 validation records "
            "(half negative, names never seen in training); the metrics are the last step's. adapter/ holds the "
            "evaluated step with the highest name-set F1 (best_metric, the default).\n\n"
            "| model | backend | end to end, s | train, s | steps | parse | presence F1 | name-set F1 | exact "
            "| hallucination | truncation | adapter/ step | its name-set F1 | last step's |\n|---|---|" + "---:|" * 12
            + "\n" + "\n".join(rows))


def parity(tmp: Path) -> str:
    out = tmp / "parity"
    timed([sys.executable, "parity.py", "run", "--preset", "tiny", "--out", str(out)], tmp / "parity.log")
    result = json.loads((out / "parity_result.json").read_text(encoding="utf-8"))
    rows = [f"| {name} | {metric_cells(m)} |" for name, m in result["metrics"].items()]
    times = result["train_seconds"]
    return ("`parity.py run --preset tiny` (ours vs Axolotl, the tiny MoE, one epoch; the shared evaluator on "
            "parity.py's seeded 100 validation records).\n\n"
            "| run | parse | presence F1 | name-set F1 | exact | hallucination | truncation |\n|---|"
            + "---:|" * 6 + "\n" + "\n".join(rows) + "\n\n| measure | value |\n|---|---:|\n"
            f"| total, min | {result['total_seconds'] / 60:.1f} |\n| train ours, s | {times['ours']:.0f} |\n"
            f"| train Axolotl, s | {times['axolotl']:.0f} |\n| verdict | {'PASS' if result['ok'] else 'FAIL'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("demo", "parity"), help="record one kind of run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tiny_runs_") as tmp:
        if args.only in (None, "demo"):
            print(append_section("demo runs", demo(Path(tmp))))
        if args.only in (None, "parity"):
            print(append_section("parity run", parity(Path(tmp)), libraries=("torch", "transformers", "trl", "peft",
                                                                             "unsloth")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
