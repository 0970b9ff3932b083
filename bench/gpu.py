"""GPU benchmark: the trainer on the Qwen3-30B-A3B architecture (fewer layers, random weights) and a
dense Qwen3 of ~0.6B, bf16 LoRA vs 4-bit QLoRA, Unsloth vs hf backend.

    .venv/bin/python -m bench.gpu [--moe-layers 8] [--steps 30] [--micro-batch 4] [--only moe dense]
                                  [--backends unsloth hf] [--gen-eval-batch 4]

Needs an NVIDIA GPU; elsewhere it says so and exits 0. Steps:
1. Library checks on the GPU: bitsandbytes 4-bit (a Linear4bit forward against
   its dequantised weight), Unsloth (imports and patches a model), flash-attn
   (imports and runs `flash_attn_func`, where installed).
2. The GPU's measured bf16 matmul rate (8192^3 GEMMs), the denominator of MFU.
3. Models built from config with random weights and saved, so both backends
   load them with `from_pretrained`: Qwen3-30B-A3B's config with
   `--moe-layers` of its 48 layers (all 128 experts per layer, router top-8),
   and Qwen3-0.6B's config. The tokenizer is the tiny one (ids < 2000 are
   valid ids of the 151,936-token vocabulary, whose LM head is kept).
4. For each model, `bf16-lora` (mode single: attention + experts/MLP) and
   `qlora-4bit` (load_in_4bit: what each two-stage stage runs), on each
   backend: one real `qwen_finetune.py` process of `--steps` optimizer steps
   over the tiny mix, timed by bench/step_timer.py, with the user's generation
   eval on (batches of `--gen-eval-batch`, left-padded) mid-run and at the end,
   so memory and any after-effect of the switch to inference are in the figures.
   Each row is labelled by what the run really stored in 4-bit, read from its
   `run_summary.json` (`weight_storage_bytes`), not by what was asked for.
   Tokens/s counts the real tokens (TRL's `num_tokens`) of the steps after the
   first, leaving out the step that follows an evaluation (the evaluation runs
   between two steps); the evaluations' own seconds (eval loss + generation,
   all of them) are the run summary's `phase_seconds`, where it has them
   ("-" where not). MFU = 4 x active parameters x tokens/s /
   measured bf16 rate (a LoRA step: forward 2N, backward to the activations
   2N, no weight gradients).

Prints a table and appends it to bench/RESULTS.md with the GPU and versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bench.flops import active_parameters, matmul_rate, mfu
from bench.results import append_section
from core.runinfo import LIBRARIES
MOE_CONFIG = REPO / "finetune" / "model_configs" / "Qwen3-30B-A3B-Instruct-2507.json"
# Qwen/Qwen3-0.6B's published config (the dense model of the family)
DENSE_0_6B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
              "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
              "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
              "torch_dtype": "bfloat16"}
# what a row is labelled by (weight_storage_bytes' categories; "other" is the norms, "lora" the adapter)
STORAGE_CATEGORIES = ("attention", "dense_mlp", "experts", "router", "embeddings")


def library_checks() -> dict:
    import torch

    checks = {}
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit

        layer = bnb.nn.Linear4bit(1024, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
        x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        error = (layer(x) - x @ weight.t()).abs().max().item()
        checks["bitsandbytes 4-bit"] = f"ok ({bnb.__version__}, max error vs dequantised {error:.1e})"
    except Exception as e:  # report, keep measuring
        checks["bitsandbytes 4-bit"] = f"FAILED: {type(e).__name__}: {e}"
    if importlib.util.find_spec("flash_attn") is None:
        checks["flash-attn"] = "not installed"
    else:
        try:
            from flash_attn import __version__, flash_attn_func

            q = torch.randn(1, 128, 8, 128, device="cuda", dtype=torch.bfloat16)
            flash_attn_func(q, q, q, causal=True)
            checks["flash-attn"] = f"ok ({__version__})"
        except Exception as e:
            checks["flash-attn"] = f"FAILED: {type(e).__name__}: {e}"
    return checks


def unsloth_check(model_dir: str) -> str:
    """In a child process: Unsloth must import before transformers, which this one has imported."""
    code = ("import unsloth, torch\nfrom unsloth import FastLanguageModel\n"
            f"m, t = FastLanguageModel.from_pretrained({model_dir!r}, max_seq_length=256, dtype=torch.bfloat16)\n"
            "m = FastLanguageModel.get_peft_model(m, r=8, target_modules=['q_proj','k_proj','v_proj','o_proj'])\n"
            "m(input_ids=torch.tensor([[1, 2, 3]], device='cuda'))\n"
            "print('UNSLOTH', unsloth.__version__, type(m.base_model.model.model.layers[0].self_attn).forward"
            ".__module__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("UNSLOTH")), None)
    return f"ok ({line.split(' ', 1)[1]})" if line else f"FAILED: {done.stderr.strip().splitlines()[-1:]}"


def moe_config(layers: int) -> dict:
    """Qwen3-30B-A3B's config (widths, 128 experts, top-8) with only `layers` of its 48 layers."""
    return {**json.loads(MOE_CONFIG.read_text()), "num_hidden_layers": layers, "max_window_layers": layers}


def build_model(out: Path, config: dict) -> dict:
    """Random weights in bf16, saved with the tiny tokenizer; returns total and active parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from finetune.model import resolve_model_path

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model_path("tiny-dense")).save_pretrained(out)
    return {"total": sum(p.numel() for p in model.parameters()), "active": active_parameters(model)}


def storage_label(storage: dict) -> str:
    """What a run stored each part as, e.g. "attention 4bit, experts 4bit, router bfloat16, ...", from
    its run_summary.json `weight_storage_bytes` ({category: {kind: bytes}})."""
    return ", ".join(f"{cat} {'+'.join(sorted(storage[cat]))}" for cat in STORAGE_CATEGORIES if storage.get(cat))


def train_once(model_dir: Path, variant: str, backend: str, args, work: Path) -> dict:
    out = work / f"run-{time.monotonic_ns()}"
    eval_steps = args.steps // 2  # one evaluation mid-run, one at the end
    cmd = [sys.executable, str(REPO / "qwen_finetune.py"), "--mode", "single", "--preset", "tiny",
           "--backend", backend, f"model_name={model_dir}", f"output_dir={out}", "gen_eval=true",
           f"eval_steps={eval_steps}", f"eval_max_samples={2 * args.gen_eval_batch}",
           f"gen_eval_max_samples={2 * args.gen_eval_batch}", f"gen_eval_batch_size={args.gen_eval_batch}",
           "dtype=bfloat16", "gradient_checkpointing=true", f"max_steps={args.steps}", "logging_steps=1",
           f"micro_batch_size={args.micro_batch}", "gradient_accumulation_steps=1", "learning_rate=1e-4",
           "save_steps=100000", "extra_callbacks=bench.step_timer.StepTimer", f"load_in_4bit={variant == 'qlora-4bit'}"]
    from bench.step_timer import run_timed  # imports transformers: not before the GPU check

    done, t = run_timed(cmd, work / f"{out.name}.json")
    if t is None:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    summary = json.loads((out / "single" / "run_summary.json").read_text())
    ends = dict(enumerate(t["steps"], start=1))  # optimizer step -> when it ended
    tokens = dict(t["num_tokens"])  # optimizer step -> tokens trained so far
    # Step s runs from the end of step s-1: not step 1 (warm-up), nor a step that waited for an evaluation.
    timed = [s for s in range(2, len(ends) + 1) if (s - 1) % eval_steps]
    return {"stored": storage_label(summary["weight_storage_bytes"]),
            "tokens_per_s": sum(tokens[s] - tokens[s - 1] for s in timed) / sum(ends[s] - ends[s - 1] for s in timed),
            "first_step_s": ends[1] - t["launched"], "peak_gib": t["peak_memory_bytes"] / 2 ** 30,
            "eval_s": summary["phase_seconds"].get("single.evaluations")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe-layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="at least 4: a mid-run evaluation and timed steps")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--only", nargs="+", default=["moe", "dense"], choices=["moe", "dense"])
    p.add_argument("--backends", nargs="+", default=["unsloth", "hf"], choices=["unsloth", "hf"])
    p.add_argument("--gen-eval-batch", type=int, default=4, help="generation eval batch (two batches per eval)")
    args = p.parse_args()
    if args.steps < 4:
        p.error("--steps must be at least 4")

    import torch

    if not torch.cuda.is_available():
        print("bench.gpu: no NVIDIA GPU here (torch.cuda.is_available() is False), nothing measured. "
              "Run it on a machine with a GPU; the CPU benchmarks are python -m bench.train_throughput, "
              "bench.padding, bench.generation_eval, bench.prepare and bench.forgetting.")
        return 0
    from data_tools.tiny_data import ensure_tiny_data

    ensure_tiny_data({"train_file": "data/tiny/hawks_train_curriculum.json"})
    gpu = torch.cuda.get_device_name(0)
    checks = library_checks()
    peak = matmul_rate("cuda", "bfloat16")  # 8192^3 GEMMs
    print(f"{gpu}: measured bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    models = {}
    if "moe" in args.only:
        models[f"Qwen3-30B-A3B arch, {args.moe_layers} of 48 layers"] = (work / "moe", moe_config(args.moe_layers))
    if "dense" in args.only:
        models["Qwen3-0.6B arch (dense)"] = (work / "dense", DENSE_0_6B)
    rows = []
    for name, (path, config) in models.items():
        params = build_model(path, config)
        if "unsloth" in args.backends and "Unsloth" not in checks:
            checks["Unsloth"] = unsloth_check(str(path))
        for variant in ("bf16-lora", "qlora-4bit"):
            for backend in args.backends:
                r = train_once(path, variant, backend, args, work)
                if "error" not in r:
                    r["mfu"] = mfu(params["active"], r["tokens_per_s"], peak)
                rows.append({"model": name, "variant": variant, "backend": backend, **params, **r})
                print(rows[-1], flush=True)
    lines = ["| model | backend | weights stored as (asked for) | tokens/s | vs hf | MFU | peak GiB | first step s "
             "| evaluations s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = f"{r['model']} | {r['backend']} | {r.get('stored', '?')} ({r['variant']})"
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} ||||||")
            continue
        hf = next((x for x in rows if x["model"] == r["model"] and x["variant"] == r["variant"]
                   and x["backend"] == "hf" and "error" not in x), None)
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        eval_s = "-" if r["eval_s"] is None else f"{r['eval_s']:.0f}"
        lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {ratio} | "
                     f"{r['mfu']:.1%} | {r['peak_gib']:.1f} | {r['first_step_s']:.0f} | {eval_s} |")
    table = "\n".join(lines)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in checks.items()) + "\n\n" + table)
    append_section(f"gpu: measured bf16 matmul {peak / 1e12:.0f} TFLOP/s",
                   f"{args.steps} steps, micro-batch {args.micro_batch}, tiny mix, gradient checkpointing, "
                   f"LoRA r16 on attention + experts/MLP, generation eval (batch {args.gen_eval_batch}) at step "
                   f"{args.steps // 2} and at the end; tokens/s leaves out step 1 and the step after the "
                   "evaluation.\n\n"
                   + "".join(f"- {k}: {v}\n" for k, v in checks.items()) + "\n" + table,
                   device=gpu, libraries=LIBRARIES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
