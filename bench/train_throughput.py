"""Training throughput of the stacks, side by side: same tiny model, data and settings.

    .venv/bin/python -m bench.train_throughput [--examples 400] [--rounds 3]

Contenders, each a fresh process per run, interleaved round by round so
machine load hits them alike:
  ours-unsloth  qwen_finetune.py --mode single --backend unsloth
  ours-hf       qwen_finetune.py --mode single --backend hf
  ours-grouped  ours-unsloth with group_by_length=true (length-grouped batches,
                less padding; off by default so parity runs draw Axolotl's batches)
  ours-packed   ours-unsloth with packing=true (several examples per padding-free
                row of up to max_length: fewer, fuller forward passes); on a CPU
                auto attention is sdpa_varlen, each example attended on its own
                (finetune/attention.py), and a micro-batch is one flattened sequence
  ours-packed-sdpa  the same with attn_implementation=sdpa: rows side by side,
                sdpa with transformers' block-diagonal mask over each whole row
  plain-trl     bench/plain_trl_sft.py (the ~40-line TRL script a user would write)
  axolotl       Axolotl 0.19 in its own environment (axolotl_configs/tiny_cpu.yml)
  axolotl-packed  the same with sample_packing: true (its multipack sampler; rows of
                sequence_len side by side, sdpa with transformers' block-diagonal mask)
All train one epoch over the same first N examples of the tiny mix (LoRA r16
on attention + MLP, micro-batch 8, max_length 640, float32, seed 3407), so
every one processes the same tokens (token parity: `parity.py tokens`).
Figures: trained tokens per second (real tokens of the epoch / time from
train begin to the last optimizer step) and time to the first optimizer step
from process launch (imports, model load, tokenisation included); medians
with min-max, and each as a ratio to plain TRL, both of the medians and paired (the median of each
round's ratio to the plain TRL run beside it); MFU against the fp32 matmul
rate measured in the same run (bench/flops.py). Appends to bench/RESULTS.md.
`--profile`: one more run per stack with steps 3-5 under torch.profiler, and
its self CPU time by kind of op (matmul, attention, loss, optimizer, ...).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bench.flops import matmul_rate, mfu
from bench.profile_ops import kinds_table, op_kinds
from bench.results import append_section
from bench.step_timer import run_timed


def commands(name: str, data: str, model_dir: str, out: Path) -> tuple[list[str], dict]:
    py = sys.executable
    ours = [py, str(REPO / "qwen_finetune.py"), "--mode", "single", "--preset", "tiny", "--overwrite",
            f"train_file={data}", "eval_file=", "gen_eval=false", f"output_dir={out}", "logging_steps=10",
            "model_name=tiny-dense",
            "save_steps=100000", "extra_callbacks=bench.step_timer.StepTimer"]
    if name == "ours-unsloth":
        return ours + ["--backend", "unsloth"], {}
    if name == "ours-hf":
        return ours + ["--backend", "hf"], {}
    if name == "ours-grouped":
        return ours + ["--backend", "unsloth", "group_by_length=true"], {}
    if name == "ours-packed":
        return ours + ["--backend", "unsloth", "packing=true"], {}
    if name == "ours-packed-sdpa":
        return ours + ["--backend", "unsloth", "packing=true", "attn_implementation=sdpa"], {}
    if name == "plain-trl":
        return [py, "-m", "bench.plain_trl_sft", model_dir, data, str(out)], {}
    import yaml

    from parity_tools.axolotl_env import axolotl_env, axolotl_python
    from parity_tools.axolotl_tiny import AXOLOTL_TINY, axolotl_model_changes, tiny_axolotl_training_config

    dataset = yaml.safe_load(AXOLOTL_TINY.read_text(encoding="utf-8"))["datasets"][0]
    config = tiny_axolotl_training_config(
        out.parent / f"{out.name}.yml", model_dir, out, plugins=["bench.axolotl_step_timer.StepTimerPlugin"],
        save_strategy="no", save_steps=None, datasets=[{**dataset, "path": data.replace(".json", ".messages.jsonl")}],
        **axolotl_model_changes("tiny-dense"), **({"sample_packing": True} if name == "axolotl-packed" else {}))
    return [str(axolotl_python()), "-m", "axolotl.cli.train", str(config)], axolotl_env()


def run_once(name: str, data: str, model_dir: str, work: Path, profile: Path | None = None) -> dict:
    out = work / f"{name}-{time.monotonic_ns()}"
    cmd, env = commands(name, data, model_dir, out)
    done, t = run_timed(cmd, work / f"{out.name}.times.json", env, profile)
    if t is None:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return {"first_step_s": t["steps"][0] - t["launched"], "train_s": t["steps"][-1] - t["train_begin"],
            "steps": len(t["steps"])}


def axolotl_version() -> str:
    from parity_tools.axolotl_env import axolotl_python

    done = subprocess.run([str(axolotl_python()), "-c", "import importlib.metadata as m; print(m.version('axolotl'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "(version unknown)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", nargs="+", default=["ours-unsloth", "ours-hf", "ours-grouped", "ours-packed",
                                                 "ours-packed-sdpa", "plain-trl", "axolotl", "axolotl-packed"])
    p.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown per stack")
    p.add_argument("--keep", action="store_true", help="keep the work folder (runs, per-op profile JSON)")
    args = p.parse_args()

    import torch

    from core.records import load_records, write_rows
    from data_tools.axolotl_data import prepare_messages
    from data_tools.stats import token_lengths
    from data_tools.tiny_data import ensure_tiny_data
    from finetune.model import resolve_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mix = "data/tiny/hawks_train_curriculum.json"
    ensure_tiny_data({"train_file": mix})
    model_dir = resolve_model_path("tiny-dense")
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = str(work / "bench_train.json")
    records = load_records(mix)[:args.examples]
    write_rows(data, records)
    prepare_messages([data.replace(".json", ".messages.jsonl")])
    tokens = sum(token_lengths(records, AutoTokenizer.from_pretrained(model_dir)))
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    results = {name: [] for name in args.only}
    for r in range(args.rounds):
        for name in args.only:
            res = run_once(name, data, model_dir, work)
            results[name].append(res)
            print(f"round {r + 1}: {name:<16} first step {res['first_step_s']:6.1f}s, "
                  f"{tokens / res['train_s']:8.0f} tokens/s ({res['steps']} steps)", flush=True)

    def stats(name, key):
        values = [x[key] for x in results[name]]
        return statistics.median(values), min(values), max(values)

    base = "plain-trl" if "plain-trl" in results else args.only[0]
    base_tps = tokens / stats(base, "train_s")[0]
    rate = matmul_rate()  # measured after the runs, in the same process: the denominator of MFU
    lines = [f"| stack | trained tokens/s, median (min-max) | vs {base} | same round vs {base}, median (min-max) "
             f"| MFU | first optimizer step, s | vs {base} |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.only:
        tps = sorted(tokens / x["train_s"] for x in results[name])
        median = statistics.median(tps)
        first = stats(name, "first_step_s")
        # paired: each round's ratio to the base run just beside it, which drifts in machine load cancel
        paired = sorted(b["train_s"] / x["train_s"] for x, b in zip(results[name], results[base]))
        lines.append(f"| {name} | {median:.0f} ({tps[0]:.0f}-{tps[-1]:.0f}) | {median / base_tps:.2f}x | "
                     f"{statistics.median(paired):.2f}x ({paired[0]:.2f}-{paired[-1]:.2f}) | "
                     f"{mfu(parameters, median, rate):.1%} | {first[0]:.1f} ({first[1]:.1f}-{first[2]:.1f}) | "
                     f"{first[0] / stats(base, 'first_step_s')[0]:.2f}x |")
    table = "\n".join(lines)
    if args.profile:
        kinds = {}
        for name in args.only:
            path = work / f"{name}.profile.json"
            run_once(name, data, model_dir, work, profile=path)
            profile = json.loads(path.read_text())
            kinds[name] = {k: ms / profile["steps"] for k, ms in op_kinds(profile["ops"]).items()}
        table += ("\n\nSelf CPU time per optimizer step by kind of op, ms (torch.profiler, steps 3-5, one run "
                  "each):\n\n" + kinds_table(kinds, "stack"))
    print("\n" + table)
    append_section("training throughput: tiny-dense, float32 on CPU",
                   f"{args.examples} examples ({tokens:,} tokens) of the tiny mix, one epoch, micro-batch 8, "
                   f"{args.rounds} interleaved rounds; MFU = 4 x {parameters:,} parameters x tokens/s / the fp32 "
                   f"matmul rate measured in the same run, {rate / 1e9:.0f} GFLOP/s"
                   + (f"; Axolotl {axolotl_version()} in its own environment"
                      if any(n.startswith("axolotl") for n in args.only) else "")
                   + ".\n\n"
                   + table, device=f"{torch.get_num_threads()} torch threads")
    if args.keep:
        print(f"runs and profiles kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
