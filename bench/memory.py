"""Peak memory of the production run at Qwen3-30B-A3B's real widths, measured on this CPU and predicted.

    .venv/bin/python -m bench.memory [--layers 2] [--precisions bf16,4bit] [--new-tokens 24]

Builds the shipped Qwen3-30B-A3B config at reduced depth (real widths: hidden
2048, all 128 experts, 8 active, expert width 768, vocab 151,936; random
weights), saves it with Qwen3's real tokenizer, and loads it the way the run
does (`finetune.model.load_base`, hf backend: bf16, or 4-bit with NF4 experts),
puts the preset's LoRA on it (`add_lora`), then measures with torch's
MemTracker (bytes held by tensors, attributed by kind; not process RSS):

- training: one optimizer step of TRL's SFTTrainer as the run builds it
  (`finetune.stages.sft_trainer`), on one packed row of `max_length` (1536)
  tokens of the full-scale synthetic mix, gradient checkpointing on;
- generation: one generation-eval batch (`generate_answers`) of the preset's
  size on the eval set's first batch (longest answers first), real prompt
  lengths, decoding capped at --new-tokens, the trainer's state still held.

Each peak is set against `finetune.memory`'s prediction for the same depth,
device (CPU) and batch; the last line names the ratio furthest from 1.
Appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

from bench.results import append_section

GIB = 1024 ** 3
REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "finetune" / "model_configs" / "Qwen3-30B-A3B-Instruct-2507.json"


def build_model_folder(folder: Path, layers: int, **narrower) -> None:
    """The real-width config at `layers` layers, random bf16 weights, and Qwen3's tokenizer. `narrower`:
    config values to override (the test suite's smaller copy: hidden_size, num_experts, ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from core import qwen3_tokenizer

    config = AutoConfig.from_pretrained(str(CONFIG))
    config.num_hidden_layers = layers
    config.max_window_layers = layers
    for key, value in narrower.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(qwen3_tokenizer.folder())).save_pretrained(str(folder))
    del model
    gc.collect()


def run_config(model_dir: Path, data: Path, out: Path, four_bit: bool, gen_batch: int, max_length: int = 1536):
    from finetune import config as config_mod

    overrides = {"backend": "hf", "model_name": str(model_dir), "output_dir": str(out), "load_in_4bit": four_bit,
                 "train_file": str(data / "hawks_train_curriculum.json"), "eval_file": "", "gen_eval": False,
                 "max_steps": 1, "logging_steps": 1, "gen_eval_batch_size": gen_batch, "mlflow": False,
                 "max_length": max_length}
    return config_mod.resolve("single", "qwen3-30b-a3b", None, overrides, {}, dry_run=True)


def one_full_row(cfg, tokenizer, records: list[dict]):
    """The packed dataset cut to its fullest row: the step trains max_length tokens (or nearly)."""
    from finetune.data import packed_if_asked, token_dataset

    rows, dropped = token_dataset(records, tokenizer, cfg.max_length)
    data = packed_if_asked(cfg, rows, None, dropped)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    best = max(range(len(lengths)), key=lengths.__getitem__)
    data.train = data.train.select([best])
    trained = sum(label != -100 for label in data.train[0]["labels"][1:])  # shifted: the head's positions
    return data, lengths[best], trained


def tensor_memory(*tracked):
    """torch's MemTracker (bytes held by tensors, by kind, peak and current) over the whole device, without
    its per-module statistics: generation calls the model once per token, which those refuse, and its
    gradient hooks go on trainable parameters only (frozen ones cannot take a hook)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHook:
        def remove(self):
            pass

    class DeviceMemory(MemTracker):
        # entered without its module tracker: its hooks and statistics are per module (and break on a
        # checkpointed layer's recompute); every tensor made inside still counts, as activation or temporary
        def __enter__(self):
            from torch._guards import active_fake_mode

            self._fake_mode_on_entry = active_fake_mode()
            self._register_global_optimizer_hook()
            self._track_resize()
            self._peak_mem_snap = self.get_tracker_snapshot()
            self._peak_mem = {dev: snap["Total"] for dev, snap in self._peak_mem_snap.items()}
            TorchDispatchMode.__enter__(self)
            return self

        def __exit__(self, *args):
            self._deregister_param_and_optimizer_hooks()
            self._restore_resize()
            TorchDispatchMode.__exit__(self, *args)

    tracker = DeviceMemory()
    for obj in tracked:
        if hasattr(obj, "named_parameters"):
            for param in obj.parameters():
                if not param.requires_grad:
                    tracker._param_to_grad_hook_handles[param] = (NoHook(), NoHook())
            tracker._track_module_params_and_buffers(obj, install_grad_hooks=True)
        else:
            tracker.track_external(obj)
    return tracker


def snapshot(tracker, kind: str) -> dict[str, int]:
    """{category: bytes} over every device MemTracker saw, for its 'peak' or 'current' snapshot."""
    out: dict[str, int] = {}
    for per_device in tracker.get_tracker_snapshot(kind).values():
        for name, size in per_device.items():
            out[str(name)] = out.get(str(name), 0) + size
    return out


def measure(model_dir: Path, data: Path, eval_records: list[dict], four_bit: bool, gen_batch: int,
            new_tokens: int, max_length: int = 1536) -> dict:
    """One precision: the tensor-level peaks of a training step and a generation batch, and the prediction."""
    from callbacks.generation_eval import generate_answers
    from core.records import load_records
    from finetune import trl_cpu
    from finetune.lora import plan_targets
    from finetune.model import add_lora, load_base
    from finetune.moe import use_experts_implementation
    from finetune.run_plan import decide_here
    from finetune.stages import sft_trainer, stages_for

    trl_cpu.install_if_needed()  # as the run does without a GPU: TRL's Triton loss kernel has no driver here
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(model_dir, data, Path(tmp), four_bit, gen_batch, max_length)
        plan = decide_here(cfg, "hf")[0]
        model, tokenizer = load_base(cfg, plan)
        experts = use_experts_implementation(model, cfg.experts_implementation, on_gpu=False)
        model = add_lora(model, cfg, "hf", plan_targets(model, cfg))
        records = load_records(cfg.train_file)[:64]
        rows, row_tokens, trained = one_full_row(cfg, tokenizer, records)
        trainer = sft_trainer(cfg, stages_for(cfg)[0], Path(tmp), plan, model, tokenizer, rows)
        train_tracker = tensor_memory(model)
        with train_tracker:
            trainer.train()
        train = {"peak": snapshot(train_tracker, "peak"), "after": snapshot(train_tracker, "current")}
        model.eval()
        release_freed_memory()
        gen_tracker = tensor_memory(model, trainer.optimizer)
        with gen_tracker:
            generate_answers(model, tokenizer, eval_records, batch_size=gen_batch, max_new_tokens=new_tokens)
        gen = {"peak": snapshot(gen_tracker, "peak")}
        predicted = predict(cfg, eval_records, new_tokens, row_tokens, trained)
    del trainer, model
    gc.collect()
    return {"train": train, "gen": gen, "row_tokens": row_tokens, "trained_tokens": trained,
            "experts_implementation": experts,
            "predicted": {"training": predicted.training, "generation": predicted.generation}}


def release_freed_memory() -> None:
    """Hand the training step's freed blocks back to the system before generating: glibc keeps them
    otherwise, and on this 24 GB machine the two phases' transients would not fit side by side."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def predict(cfg, gen_records: list[dict], new_tokens: int, row_tokens: int, trained_tokens: int):
    """finetune.memory's estimate of this run on this CPU, from the meta model as the dry run builds it: one
    process, the first step (its optimizer state is made after the backward), the eager experts loop and
    the CPU loss fallback."""
    from finetune.lora import count_parameters
    from finetune.memory import Launcher, estimate
    from callbacks.generation_eval import prompt_lengths
    from finetune.model import load_tokenizer
    from finetune.model_source import meta_model
    from finetune.memory_plan import memory_shape, with_lora

    model, model_config, _ = meta_model(cfg)
    _, peft_model = with_lora(model, cfg)
    shape = memory_shape(cfg, peft_model, model_config, count_parameters(peft_model)["trainable"], "hf")
    prompt = max(prompt_lengths(gen_records, load_tokenizer(cfg)))
    return estimate(shape, Launcher(), tokens=row_tokens, gpu=False, checkpointing=cfg.gradient_checkpointing,
                    gen_batch=len(gen_records), prompt_tokens=prompt, new_tokens=new_tokens, first_step=True,
                    trained_tokens=trained_tokens)


def first_gen_batch(eval_file: Path, tokenizer_dir: Path, size: int) -> list[dict]:
    """The eval records of the generation eval's first batch (its batch order: longest answers first)."""
    from transformers import AutoTokenizer

    from callbacks.generation_eval import batch_order, gold_answer_lengths
    from core.prompt import record_messages
    from core.records import load_records

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    records = load_records(str(eval_file))
    prompts = [tokenizer.apply_chat_template(record_messages(r, with_answer=False), tokenize=False,
                                             add_generation_prompt=True) for r in records]
    order = batch_order([len(p) for p in prompts], gold_answer_lengths(records, tokenizer))
    return [records[i] for i in order[:size]]


def table(results: dict, layers: int) -> tuple[str, str]:
    """(the markdown table of predicted vs measured, the closing line for the ratio furthest from 1)."""
    rows, worst = [], None
    for precision, r in results.items():
        pred_train, pred_gen = r["predicted"]["training"], r["predicted"]["generation"]
        measured_opt = r["train"]["after"].get("_MemRefType.OPT", 0)
        pairs = [("training step (first)", sum(pred_train.values()), r["train"]["peak"]["Total"], True),
                 ("optimizer state after it", r["predicted"]["generation"]["optimizer"], measured_opt, False),
                 ("generation batch", sum(pred_gen.values()), r["gen"]["peak"]["Total"], True)]
        for name, predicted, measured, is_peak in pairs:
            ratio = predicted / measured if measured else float("nan")
            rows.append(f"| {precision} | {name} | {predicted / GIB:.3f} | {measured / GIB:.3f} | {ratio:.3f} |")
            if is_peak and (worst is None or abs(ratio - 1) > abs(worst[2] - 1)):
                worst = (predicted, measured, ratio)
        parts = ", ".join(f"{k} {v / GIB:.3f}" for k, v in pred_train.items())
        rows.append(f"| {precision} | predicted training components | {parts} | | |")
    head = "| precision | peak | predicted GiB | measured GiB | predicted / measured |\n|---|---|---:|---:|---:|"
    line = (f"peak: predicted {worst[0] / GIB:.2f} GiB, measured {worst[1] / GIB:.2f} GiB at {layers} layers "
            f"(ratio {worst[2]:.2f})")
    return head + "\n" + "\n".join(rows), line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--precisions", default="bf16,4bit")
    p.add_argument("--gen-batch", type=int, default=32, help="generation batch (the preset's)")
    p.add_argument("--new-tokens", type=int, default=2, help="decoding steps measured: every step refolds the experts (PEFT), seconds each on this CPU; the KV cache's growth past them is arithmetic")
    p.add_argument("--json", help="also write the measurements here")
    p.add_argument("--max-length", type=int, default=1536, help="tokens of the packed training row (the preset's)")
    p.add_argument("--narrow", default="", help="config overrides for a smaller model, e.g. "
                   "hidden_size=512,num_experts=16 (the test suite's size); not the real widths")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()

    from bench.padding import full_scale_mix
    from core import qwen3_tokenizer

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full_scale_mix(tmp)
        model_dir = tmp / "model"
        narrower = {k: int(v) for k, v in (item.split("=") for item in args.narrow.split(",") if item)}
        build_model_folder(model_dir, args.layers, **narrower)
        eval_records = first_gen_batch(tmp / "hawks_val_mixed.json", qwen3_tokenizer.folder(), args.gen_batch)
        for precision in args.precisions.split(","):
            results[precision] = measure(model_dir, tmp, eval_records, precision == "4bit", args.gen_batch,
                                         args.new_tokens, args.max_length)
            print(precision, json.dumps(results[precision], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    body, line = table(results, args.layers)
    print(body)
    if not args.no_record and not args.narrow:
        first = next(iter(results.values()))
        append_section(
            f"Peak memory at Qwen3-30B-A3B's real widths, {args.layers} layers, CPU: predicted vs measured",
            f"bench/memory.py: MemTracker (tensor bytes), hf backend, one packed row of {first['row_tokens']} "
            f"tokens ({first['trained_tokens']} trained) with gradient checkpointing; a generation batch of "
            f"{args.gen_batch} (the eval set's first, real prompt lengths with Qwen3's tokenizer), "
            f"{args.new_tokens} new tokens.\n\n{body}\n\n{line}")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
