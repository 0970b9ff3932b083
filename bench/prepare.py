"""Time `data_tools prepare` on the user's full scale: 26,221 positives + 96,000 negatives.

    .venv/bin/python -m bench.prepare [--runs 3]

Generates the synthetic inputs once into a temp folder, then runs `prepare`
as a separate process --runs times and reports the median wall time (min-max)
and the peak resident memory of that process. Targets: <= 20 s, <= 1.5 GB.
Appends the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bench.results import append_section


def synth_inputs(folder: Path) -> None:
    """The user's full-scale inputs, synthetic: 26,221 positives, 100,000 negatives, 1,000 validation."""
    subprocess.run([sys.executable, "-m", "data_tools", "synth", "--out-dir", str(folder)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})


def prepare_command(data: Path, out: Path) -> list[str]:
    """`data_tools prepare` over synth_inputs' files: the negative-sampled mix, out/hawks_train_curriculum.json."""
    return [sys.executable, "-m", "data_tools", "prepare", "--force",
            "--positives", str(data / "hawks_train.json"), "--val", str(data / "hawks_val.json"),
            "--negatives", str(data / "person_dummy_2025-12-23-1817.json"),
            "--out", str(out / "hawks_train_curriculum.json"), "--val-out", str(out / "hawks_val_mixed.json")]


def run_once(data: Path, out: Path) -> tuple[float, float]:
    cmd = prepare_command(data, out)
    # A fresh wrapper process per run, so RUSAGE_CHILDREN's maximum is this run's own.
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    seconds, max_rss_kb = res.stdout.split()
    return float(seconds), int(max_rss_kb) / 1024**2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        synth_inputs(tmp)
        synth_s = time.perf_counter() - t
        sizes = {p.name: p.stat().st_size / 1024**2 for p in tmp.glob("*.json")}
        runs = [run_once(tmp, tmp) for _ in range(args.runs)]
    secs = [r[0] for r in runs]
    peak = max(r[1] for r in runs)
    rows = [
        ("inputs", f"26,221 positives + 100,000 negatives + 1,000 val ({sum(sizes.values()):.0f} MB JSON)"),
        ("synth (one run)", f"{synth_s:.1f} s"),
        ("prepare wall time", f"{statistics.median(secs):.1f} s median ({min(secs):.1f}-{max(secs):.1f}), "
                              f"{len(secs)} runs; target <= 20 s"),
        ("prepare peak RSS", f"{peak:.2f} GB; target <= 1.5 GB"),
    ]
    print("\nbench/prepare.py")
    for k, v in rows:
        print(f"  {k:18} {v}")
    append_section("prepare", "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows),
                   libraries=())
    return 0


if __name__ == "__main__":
    sys.exit(main())
