"""Forgetting on the tiny preset: general-text loss increase and task metrics, with and without
distillation from the base and rehearsal of general text.

    .venv/bin/python -m bench.forgetting [--lambdas 0 0.1 0.5 2] [--ratios 0 0.2] [--max-steps N]

Each cell is one real `qwen_finetune.py --mode single` run (same data, seed and
settings) with `rehearsal_data=data/tiny/general_text.jsonl`, so every run is
measured on the same held-out general documents (the file's seeded held-out
part; rehearsal_ratio 0 only holds them out). The general text is the kind of
plain news text the tiny base was pre-trained on: "what the base knew".
Task metrics are the generation eval on the validation split. Counting losses
and metrics, not timing, so one run per cell. Appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results import append_section
from core.metrics import HEADLINE

REPO = Path(__file__).resolve().parent.parent
GENERAL = "data/tiny/general_text.jsonl"
TASK = tuple(m for m in HEADLINE if m != "gen_truncation_rate")


def run(out: Path, distill_lambda: float, ratio: float, extra: list[str]) -> dict:
    cmd = [sys.executable, str(REPO / "qwen_finetune.py"), "--mode", "single", f"output_dir={out}",
           f"distill_lambda={distill_lambda}", f"rehearsal_data={GENERAL}", f"rehearsal_ratio={ratio}", *extra]
    print(f"\n>>> lambda {distill_lambda}, rehearsal {ratio}: {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        sys.exit(f"run failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    summary = json.loads((out / "single" / "run_summary.json").read_text())
    print(result.stdout[result.stdout.find("=== run summary ==="):], flush=True)
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 0.5, 2.0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.2])
    p.add_argument("--max-steps", type=int, default=-1, help="default: one epoch of the tiny preset")
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args()
    extra = [f"max_steps={args.max_steps}", f"distill_temperature={args.temperature}", "eval_max_samples=100"]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            for lam in args.lambdas:
                s = run(Path(tmp) / f"l{lam}-r{ratio}", lam, ratio, extra)
                m = s["metrics"]
                rows.append({"lambda": lam, "ratio": ratio, "steps": s["global_step"],
                             "seconds": s["train_seconds"], "rehearsal": s["data"]["sources"].get("rehearsal", 0),
                             "base": m["general_loss_base"], "tuned": m["general_loss_tuned"],
                             "increase": m["general_loss_increase"], **{k: m.get(k, float("nan")) for k in TASK}})
    header = ("| lambda | rehearsal ratio | steps | train s | general loss base | tuned | increase | "
              "parse | presence F1 | name F1 | exact | halluc. |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    table = header + "".join(
        f"| {r['lambda']} | {r['ratio']} ({r['rehearsal']} ex.) | {r['steps']} | {r['seconds']:.0f} | "
        f"{r['base']:.4f} | {r['tuned']:.4f} | **{r['increase']:+.4f}** | "
        + " | ".join(f"{r[k]:.3f}" for k in TASK) + " |\n" for r in rows)
    print("\n" + table)

    append_section("forgetting: tiny preset on CPU",
                   f"`python -m bench.forgetting --lambdas {' '.join(map(str, args.lambdas))} --ratios "
                   f"{' '.join(map(str, args.ratios))} --max-steps {args.max_steps} --temperature "
                   f"{args.temperature}`. General loss: mean token loss on the same held-out plain news "
                   "documents (base = adapter disabled); increase > 0 means forgotten. Task metrics: generation "
                   "eval, 100 validation records.\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
