"""The MoE experts implementations side by side: LoRA training tokens/s on the tiny MoE, and MFU.

    .venv/bin/python -m bench.experts [--rounds 5] [--steps 5] [--rows 8]

transformers 5 runs fused experts in one of three ways (`experts_implementation`): `eager`, a loop over
the experts that received tokens; `batched_mm`, each token's experts gathered into one batched matmul;
`grouped_mm`, tokens sorted by expert and one grouped GEMM per projection (torch's kernel on CUDA SM80+
and, from torch 2.9, on CPU). For each, the trainer's own model and LoRA (`finetune.model.load_base`,
`add_lora`: attention + the fused experts) runs forward + backward over the same batch of real tokens
(the first `--rows` examples of the tiny mix, collated as the trainer collates them), interleaved round
by round so machine load hits them alike. The losses must agree (a check, not a timing).

MFU = 4 x active parameters x tokens/s / the matmul rate measured in the same run (fp32 on CPU, bf16 on a
GPU): a LoRA step is forward 2N and backward to the activations 2N, without weight gradients for the
frozen base (the convention of bench/gpu.py). Appends the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.flops import active_parameters, matmul_rate, mfu
from bench.results import append_section

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="forward+backward passes per implementation and round")
    p.add_argument("--rows", type=int, default=8, help="examples per batch")
    p.add_argument("--only", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    args = p.parse_args()

    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from data_tools.tiny_data import ensure_tiny_data
    from finetune import config as config_mod
    from finetune import trl_cpu
    from finetune.data import load_split, token_dataset
    from finetune.lora import plan_targets
    from finetune.model import add_lora, load_base
    from finetune.run_plan import decide_here

    trl_cpu.install_if_needed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    mix = "data/tiny/hawks_train_curriculum.json"
    ensure_tiny_data({"train_file": mix})
    cfg = config_mod.resolve("single", "tiny", None, {"model_name": "tiny-moe", "eval_file": "", "dtype": dtype}, {})
    model, tokenizer = load_base(cfg, decide_here(cfg, "hf")[0])
    model = add_lora(model, cfg, "hf", plan_targets(model, cfg)).to(device)
    model.train()
    base = model.get_base_model()
    rows, _ = token_dataset(load_split(mix, 0, cfg.seed)[:args.rows], tokenizer, cfg.max_length)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(list(rows))
    batch = {k: v.to(device) for k, v in batch.items()}
    tokens = int(batch["attention_mask"].sum())

    def run(implementation: str) -> tuple[float, float]:
        base.set_experts_implementation(implementation)
        assert base.config._experts_implementation == implementation, base.config._experts_implementation
        loss = model(**batch).loss  # warm-up, and the loss to compare
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return args.steps * tokens / (time.perf_counter() - start), float(loss)

    results = {name: [] for name in args.only}
    losses = {}
    for r in range(args.rounds):
        for name in args.only:
            rate, losses[name] = run(name)
            results[name].append(rate)
            print(f"round {r + 1}: {name:<11} {rate:8.0f} tokens/s, loss {losses[name]:.6f}", flush=True)
    first = args.only[0]
    for name, loss in losses.items():
        if abs(loss - losses[first]) > 1e-4 * abs(losses[first]):
            raise SystemExit(f"{name}: loss {loss} differs from {first}'s {losses[first]}")
    flops = matmul_rate(device, dtype)
    active = active_parameters(model)
    reference = statistics.median(results[first])
    lines = [f"| experts implementation | tokens/s, median (min-max) | vs {first} | MFU | loss |",
             "|---|---:|---:|---:|---:|"]
    for name in args.only:
        rates = sorted(results[name])
        median = statistics.median(rates)
        lines.append(f"| {name} | {median:.0f} ({rates[0]:.0f}-{rates[-1]:.0f}) | {median / reference:.2f}x | "
                     f"{mfu(active, median, flops):.1%} | {losses[name]:.6f} |")
    table = "\n".join(lines)
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} torch threads"
    text = (f"The tiny MoE (8 experts, top-2; {active:,} active parameters) with LoRA on attention and the "
            f"fused experts, {dtype}, forward + backward over {args.rows} examples ({tokens:,} real tokens) "
            f"of the tiny mix, {args.steps} passes x {args.rounds} interleaved rounds. Matmul rate measured in "
            f"the same run: {flops / 1e9:.0f} GFLOP/s ({dtype}); MFU = 4 x active parameters x tokens/s / "
            "that rate.\n\n")
    print("\n" + text + table)
    append_section("experts implementations: tiny MoE", text + table, device=where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
