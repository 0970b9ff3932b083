"""The real-width probe: time of a training step, a generation prefill and a decode step at Qwen3-30B-A3B's
widths, and on a GPU their peak memory, set against the dry run's plans (finetune/timing.py,
finetune/memory.py).

    .venv/bin/python -m bench.probe [--layers 2] [--precisions bf16] [--backends hf] [--gen-batch 16]
    python -m bench.probe --layers 4,8 --precisions bf16,4bit --backends unsloth,hf --gen-batch 64   # a GPU

The model of bench/memory.py (the shipped config at reduced depth: hidden 2048, all 128 experts, 8
active, random weights, Qwen3's tokenizer), loaded and given the preset's LoRA the way the run does, on
each backend. Timed: the last of `--steps` optimizer steps of TRL's SFTTrainer on one packed row of
max_length tokens (the first ones warm up, compile, create the optimizer state), then a generation-eval
batch of `--gen-batch` (the eval set's first, real prompt lengths) with one new token (the prefill) and
with 1 + N (N decode steps). On a GPU each phase's peak is torch's max_memory_allocated (what the
caching allocator handed out; the CUDA context is outside it), against the plan's peak less its context.

Predicted times: on a CPU the roofline with this CPU's rates measured in the same run (bf16 matmul, copy
bandwidth) at full share and no launch cost, so the ratio is what the roofline does not see; on a GPU the
dry run's own figures (datasheet peaks at its assumed shares), so the ratio says how far the dry run's
training hours and evaluation minutes are off. Appends a section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.memory import build_model_folder, first_gen_batch, one_full_row, run_config
from bench.results import append_section

GIB = 1024 ** 3
REPO = Path(__file__).resolve().parent.parent


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    """Bytes/s moved by a large bf16 copy (read + write), median of 5."""
    import torch

    src = torch.randn(int(gib * GIB // 2), dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    rates = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        rates.append(2 * src.numel() * 2 / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else 0.0


def step_timer(device: str, last_step: int):
    """A TrainerCallback that times each step and resets the peak before the last one."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.peak = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == last_step:
                reset_peak(device)
            sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.seconds.append(time.perf_counter() - self._start)
            if state.global_step == last_step:
                self.peak = peak(device)

    return StepTimer()


def measure(model_dir: Path, data: Path, eval_records: list[dict], backend: str, four_bit: bool,
            gen_batch: int, new_tokens: int, steps: int, device: str, max_length: int = 1536) -> dict:
    from callbacks.generation_eval import generate_answers, prompt_lengths
    from core.records import load_records
    from finetune import trl_cpu
    from finetune.lora import plan_targets
    from finetune.model import add_lora, load_base
    from finetune.moe import expert_lora_path, use_experts_implementation
    from finetune.run_plan import confirm, decide_here
    from finetune.stages import sft_trainer, stages_for

    trl_cpu.install_if_needed()  # as the run does without a GPU
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(run_config(model_dir, data, Path(tmp), four_bit, gen_batch, max_length),
                                  max_steps=steps, backend=backend)
        plan = decide_here(cfg, backend)[0]
        model, tokenizer = load_base(cfg, plan)
        experts = use_experts_implementation(model, cfg.experts_implementation, on_gpu=device == "cuda")
        plan = confirm(plan, model, experts)[0]
        model = add_lora(model, cfg, backend, plan_targets(model, cfg))
        rows, row_tokens, trained = one_full_row(cfg, tokenizer, load_records(cfg.train_file)[:64])
        timer = step_timer(device, steps)
        trainer = sft_trainer(cfg, stages_for(cfg)[0], Path(tmp), plan, model, tokenizer, rows, [timer])
        trainer.train()
        model.eval()
        # untimed first: a first generate pays one-time costs (Unsloth's inference switch, kernel choices)
        generate_answers(model, tokenizer, eval_records, batch_size=gen_batch, max_new_tokens=1 + new_tokens)
        timed, peaks = {}, {}
        for tokens in (1, 1 + new_tokens):
            reset_peak(device)
            start = time.perf_counter()
            answers = generate_answers(model, tokenizer, eval_records, batch_size=gen_batch, max_new_tokens=tokens)
            sync(device)
            timed[tokens], peaks[tokens] = time.perf_counter() - start, peak(device)
        result = {"cfg": cfg, "row_tokens": row_tokens, "trained_tokens": trained,
                  "step_s": timer.seconds[-1], "first_step_s": timer.seconds[0],
                  "prefill_s": timed[1], "decode_step_s": (timed[1 + new_tokens] - timed[1]) / new_tokens,
                  "prompt_tokens": max(prompt_lengths(eval_records, tokenizer)),
                  "stopped_early": sum(not a["truncated"] for a in answers),
                  "train_peak": timer.peak, "gen_peak": peaks[1 + new_tokens],
                  "experts": experts, "expert_lora": expert_lora_path(model)}
    del trainer, model
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return result


def predicted(m: dict, rates, gen_batch: int, new_tokens: int, device: str) -> dict:
    """The plans for what was measured: times from finetune.timing, on a GPU the peaks from finetune.memory
    (one process, steady state, less the CUDA context the allocator does not count)."""
    from finetune.lora import count_parameters
    from finetune.memory import Launcher, estimate
    from finetune.model_source import meta_model
    from finetune.memory_plan import memory_shape, with_lora
    from finetune.timing import decode_step_seconds, prefill_seconds, train_flops

    cfg = m["cfg"]
    model, model_config, _ = meta_model(cfg)
    plan, peft_model = with_lora(model, cfg)
    shape = memory_shape(cfg, peft_model, model_config, count_parameters(peft_model)["trainable"], cfg.backend)
    rank = plan.expert_rank or cfg.lora_r
    prompt = m["prompt_tokens"]
    # the synthetic examples average ~260 tokens: a packed row's attention spans its own example
    flops = train_flops(shape, m["row_tokens"], context=130, rank=rank, checkpointing=cfg.gradient_checkpointing)
    out = {"step_s": flops / (rates.flops * rates.matmul_share),
           # max_new_tokens=1: the prefill, and the head once more for the token it returns
           "prefill_s": prefill_seconds(shape, rates, gen_batch, prompt, rank)
           + decode_step_seconds(shape, rates, gen_batch, prompt),
           "decode_step_s": decode_step_seconds(shape, rates, gen_batch, prompt + new_tokens / 2),
           "layers": shape.layers}
    if device == "cuda":
        est = estimate(shape, Launcher(), tokens=m["row_tokens"], gpu=True,
                       checkpointing=cfg.gradient_checkpointing, gen_batch=gen_batch, prompt_tokens=prompt,
                       new_tokens=1 + new_tokens, trained_tokens=m["trained_tokens"])
        out.update({"train_peak": est.training_peak - est.overhead, "gen_peak": est.generation_peak - est.overhead})
    return out


def device_rates(device: str) -> tuple[dict, str]:
    """(the Rates the prediction uses, as a dict, a note on them): on a GPU the dry run's own, on a CPU
    this CPU's measured in this run at full share."""
    import dataclasses as dc

    from bench.flops import matmul_rate
    from finetune.timing import Rates, gpu_rates

    measured_flops, measured_bw = matmul_rate(device, "bfloat16"), copy_bandwidth(device)
    if device == "cuda":
        import torch

        rates = gpu_rates(torch.cuda.get_device_name())
        note = (f"the dry run's rates ({rates.name}: {rates.flops / 1e12:.0f} TFLOP/s x {rates.matmul_share}, "
                f"{rates.bandwidth / 1e12:.2f} TB/s x {rates.bandwidth_share}); measured here: bf16 matmul "
                f"{measured_flops / 1e12:.0f} TFLOP/s, copy {measured_bw / 1e12:.2f} TB/s")
        return dc.asdict(rates), note
    rates = Rates("this CPU", measured_flops, measured_bw, matmul_share=1.0, bandwidth_share=1.0,
                  layer_overhead_s=0.0, source="measured in this run")
    return dc.asdict(rates), (f"this CPU's rates measured in this run at full share, no per-layer cost: bf16 "
                              f"matmul {measured_flops / 1e9:.0f} GFLOP/s, copy {measured_bw / 1e9:.1f} GB/s")


def rows_of(label: str, m: dict, pred: dict, gen_batch: int) -> list[str]:
    def ratio(predicted: float, measured: float) -> str:
        return f"{predicted / measured:.2f}" if measured > 0 else "-"

    rows = []
    for phase, what in (("step_s", f"training step (1 x {m['row_tokens']} tokens)"),
                        ("prefill_s", f"prefill ({gen_batch} x {m['prompt_tokens']})"),
                        ("decode_step_s", f"decode step (batch {gen_batch})")):
        per_layer = m[phase] / pred["layers"] * 1000
        rows.append(f"| {label} | {what} | {pred[phase]:.3f} s | {m[phase]:.3f} s | {ratio(pred[phase], m[phase])} | "
                    f"{per_layer:.1f} |")
    for phase, what in (("train_peak", "training step peak"), ("gen_peak", "generation batch peak")):
        if phase in pred:
            rows.append(f"| {label} | {what} | {pred[phase] / GIB:.2f} GiB | {m[phase] / GIB:.2f} GiB | "
                        f"{ratio(pred[phase], m[phase])} | |")
    return rows


def probe_one(job: dict) -> dict:
    """One backend and precision in this process (a fresh one: Unsloth patches transformers, TRL and PEFT
    for the whole process, and must be imported before them, as the command line does)."""
    from finetune.model import import_backend

    backend, _ = import_backend(job["backend"])
    import torch

    from finetune.timing import Rates

    device = "cuda" if torch.cuda.is_available() else "cpu"
    label = f"{job['layers']} layers, {backend}, {job['precision']}"
    try:
        m = measure(Path(job["model_dir"]), Path(job["data"]), job["eval_records"], backend,
                    job["precision"] == "4bit", job["gen_batch"], job["new_tokens"], job["steps"], device,
                    job["max_length"])
        rows = rows_of(f"{label} ({m['experts']}, LoRA {m['expert_lora']})", m,
                       predicted(m, Rates(**job["rates"]), job["gen_batch"], job["new_tokens"], device),
                       job["gen_batch"])
        return {"rows": rows, "note": f"first step {m['first_step_s']:.1f} s; rows that stopped early: "
                                      f"{m['stopped_early']}"}
    except Exception as e:  # one failed combination must not cost the others' figures
        return {"rows": [f"| {label} | failed: {type(e).__name__}: {str(e)[:160]} | | | | |"], "note": ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2", help="comma-separated depths (the slope per layer: two of them)")
    p.add_argument("--precisions", default="bf16")
    p.add_argument("--backends", default="hf", help="hf, unsloth (GPU) or both, comma-separated")
    p.add_argument("--gen-batch", type=int, default=16, help="generation batch")
    p.add_argument("--new-tokens", type=int, default=4, help="decode steps timed")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps, the last timed (default: 2 on a CPU, "
                   "3 on a GPU)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--max-length", type=int, default=1536, help="tokens of the packed training row (the preset's)")
    p.add_argument("--narrow", default="", help="config overrides for a smaller model, e.g. "
                   "hidden_size=512,num_experts=16 (the test suite's size); not the real widths")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: one combination, in a child process
    args = p.parse_args()
    if args.job:
        print("PROBE_RESULT " + json.dumps(probe_one(json.loads(Path(args.job).read_text()))), flush=True)
        return 0

    import torch

    from bench.padding import full_scale_mix
    from core import qwen3_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = args.steps or (3 if device == "cuda" else 2)
    rates, note = device_rates(device)
    print(note, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full_scale_mix(tmp)
        eval_records = first_gen_batch(tmp / "hawks_val_mixed.json", qwen3_tokenizer.folder(), args.gen_batch)
        for layers in [int(n) for n in args.layers.split(",")]:
            model_dir = tmp / f"model-{layers}"
            narrower = {k: int(v) for k, v in (item.split("=") for item in args.narrow.split(",") if item)}
            build_model_folder(model_dir, layers, **narrower)
            for backend in args.backends.split(","):
                for precision in args.precisions.split(","):
                    job = tmp / "job.json"
                    job.write_text(json.dumps({"backend": backend, "precision": precision, "layers": layers,
                                               "model_dir": str(model_dir), "data": str(tmp), "steps": steps,
                                               "eval_records": eval_records, "gen_batch": args.gen_batch,
                                               "new_tokens": args.new_tokens, "rates": rates,
                                               "max_length": args.max_length}, ensure_ascii=False))
                    child = subprocess.run([sys.executable, "-m", "bench.probe", "--job", str(job)], cwd=REPO,
                                           capture_output=True, text=True)
                    result = next((json.loads(line.removeprefix("PROBE_RESULT "))
                                   for line in child.stdout.splitlines() if line.startswith("PROBE_RESULT ")), None)
                    if result is None:
                        result = {"rows": [f"| {layers} layers, {backend}, {precision} | failed: exit "
                                           f"{child.returncode}: {child.stderr.strip()[-160:]} | | | | |"], "note": ""}
                    rows += result["rows"]
                    print("\n".join(result["rows"]), f"\n({result['note']})", flush=True)
            shutil.rmtree(model_dir, ignore_errors=True)
    body = ("| model | phase | predicted | measured | predicted / measured | measured ms per layer |\n"
            "|---|---|---:|---:|---:|---:|\n" + "\n".join(rows))
    print(body)
    if not args.no_record and not args.narrow:
        where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        append_section(f"Real-width probe ({where}): step, prefill and decode time"
                       + (" and peak memory" if device == "cuda" else "") + ", predicted vs measured",
                       f"bench/probe.py: Qwen3-30B-A3B's widths at {args.layers} layers, the preset's LoRA, a "
                       f"packed row of max_length tokens, the last of {steps} steps; generation batch "
                       f"{args.gen_batch} of the eval set's first records, {args.new_tokens} decode steps, after "
                       f"an untimed one; one process per backend and precision. Predicted with {note}.\n\n{body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
