"""Does bf16 pay on this CPU? float32 against bfloat16, side by side in one run (issue 33's question).

    .venv/bin/python -m bench.cpu_bf16 [--steps 40] [--rounds 2]

Three levels, each timed in float32 and in bf16 one right after the other:
  matmul      the square matmul rate (bench/flops.py), 2048 x 2048;
  attention   sdpa forward + backward at the demo's shape (8 x 4 heads x 326 tokens x 64, padding mask);
  training    ours on the tiny MoE (the demo's settings, no evaluation), `dtype=float32` against
              `dtype=bfloat16` (bf16 weights, the trainer's autocast, float32 LoRA and optimizer):
              the median optimizer step from bench/step_timer.py.
The CPU's bf16 units are named from torch's own checks (AMX tiles, AVX512-BF16). Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.flops import matmul_rate
from bench.results import append_section
from bench.step_timer import run_timed

REPO = Path(__file__).resolve().parent.parent


def bf16_units() -> str:
    import torch

    amx = torch.cpu._is_amx_tile_supported()
    avx = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return ", ".join(n for n, on in (("AMX tiles", amx), ("AVX512-BF16", avx)) if on) or "none"


def attention_ms(dtype: str, repeats: int = 10) -> float:
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(8, 4, 326, 64, dtype=getattr(torch, dtype), requires_grad=True) for _ in range(3))
    mask = torch.ones(8, 1, 326, 326, dtype=torch.bool).tril()
    grad = torch.randn_like(q)

    def once():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats * 1000


def training_step_ms(dtype: str, steps: int, work: Path) -> float:
    out = work / f"{dtype}-{time.monotonic_ns()}"
    cmd = [sys.executable, str(REPO / "qwen_finetune.py"), "--mode", "single", "--preset", "tiny", "--overwrite",
           "eval_file=", "gen_eval=false", f"output_dir={out}", f"max_steps={steps}", "save_steps=100000",
           f"dtype={dtype}", "extra_callbacks=bench.step_timer.StepTimer"]
    done, times = run_timed(cmd, work / f"{out.name}.times.json")
    if times is None:
        raise SystemExit(f"training in {dtype} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    steps_at = times["steps"][5:]  # after warm-up
    return statistics.median(b - a for a, b in zip(steps_at, steps_at[1:])) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import torch

    from data_tools.tiny_data import ensure_tiny_data

    ensure_tiny_data({"train_file": "data/tiny/hawks_train_curriculum.json"})
    work = Path(tempfile.mkdtemp(prefix="bench-bf16-"))
    rows = {"matmul, GFLOP/s": {}, "sdpa forward + backward, ms": {}, "training step, ms (median)": {}}
    for _ in range(args.rounds):
        for dtype in ("float32", "bfloat16"):  # interleaved: machine load hits both alike
            rows["matmul, GFLOP/s"].setdefault(dtype, []).append(matmul_rate(dtype=dtype) / 1e9)
            rows["sdpa forward + backward, ms"].setdefault(dtype, []).append(attention_ms(dtype))
            rows["training step, ms (median)"].setdefault(dtype, []).append(training_step_ms(dtype, args.steps, work))
    lines = ["| measure | float32 | bfloat16 | bf16 speed-up |", "|---|---:|---:|---:|"]
    for name, by_dtype in rows.items():
        f32, bf16 = statistics.median(by_dtype["float32"]), statistics.median(by_dtype["bfloat16"])
        faster = bf16 / f32 if name.startswith("matmul") else f32 / bf16
        lines.append(f"| {name} | {f32:,.1f} | {bf16:,.1f} | {faster:.2f}x |")
    table = "\n".join(lines)
    print(f"bf16 units: {bf16_units()}\n\n{table}")
    append_section("bf16 on this CPU: float32 against bfloat16",
                   f"bf16 units: {bf16_units()}; medians of {args.rounds} interleaved rounds; training: the tiny "
                   f"MoE with the demo's settings, {args.steps} steps, no evaluation.\n\n" + table,
                   device=f"{torch.get_num_threads()} torch threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
