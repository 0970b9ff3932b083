"""Is a packed batch the same computation as its examples one by one? Run in its own process (Unsloth
patches transformers at import), on the backend's own model loader and LoRA, through the trainer's own
dataset step, collator and loss:

    python tests/packing_check.py BACKEND MODEL[:ATTENTION[:DTYPE]] ...   # one result line per variant

Every variant of a backend runs in the one process (tests call run() or run_variants()).

- per-token loss: every example of the trainer's first packed batch, forwarded alone, gives the same
  cross-entropy at every trained token as inside its packed row (no attention across the boundary,
  positions restarting at 0), and as inside the batch flattened into one padding-free sequence (the
  layout TRL's collator gives FlashAttention);
- gradient: the trainer's `compute_loss` summed over one epoch of packed batches and over one epoch of
  unpacked (padded) batches, each normalised by the epoch's trained-token count as gradient accumulation
  does, gives the same LoRA gradient: one optimizer step over the same examples is the same step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


RESULT = "packing-check result: "


def run(backend: str, model: str, attention: str = "auto", dtype: str = "float32", timeout: int = 600) -> dict:
    return run_variants(backend, [(model, attention, dtype)], timeout)[0]


def run_variants(backend: str, variants: list[tuple[str, ...]], timeout: int = 900) -> list[dict]:
    """The check of each (model, attention[, dtype]) in one fresh interpreter (Unsloth patches at import, for
    the whole process): their results in order, each with everything else the process printed (`printed`)."""
    done = subprocess.run([sys.executable, str(Path(__file__)), backend, *(":".join(v) for v in variants)],
                          cwd=REPO, text=True, capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    printed = "\n".join(line for line in lines if not line.startswith(RESULT))
    return [{**json.loads(line.removeprefix(RESULT)), "printed": printed} for line in lines if line.startswith(RESULT)]


def main(backend: str, model_name: str, attention: str = "auto", dtype: str = "float32") -> dict:
    from finetune.model import import_backend

    backend, _ = import_backend(backend)
    import torch

    from finetune import trl_cpu

    trl_cpu.install_if_needed()  # as the trainer does without a GPU

    from data_tools.synth import generate
    from finetune.config import resolve
    from finetune.data import stage_data
    from finetune.lora import plan_targets
    from finetune.model import add_lora, load_base
    from finetune.model_source import load_model_config
    from finetune.run_plan import Machine, confirm, decide
    from finetune.stages import sft_trainer, stages_for

    def config(packing: bool):
        return resolve("single", "tiny", None, {"model_name": model_name, "eval_file": "",
                                                "packing": str(packing), "micro_batch_size": "2",
                                                "attn_implementation": attention, "dtype": dtype}, {}, None)

    def plan(packing: bool, model_config):  # the trainer's run plan (finetune/run_plan.py) on this machine
        return decide(config(packing), model_config, Machine.this_launch(), (backend, "the packing check's"))

    cfg = config(True)
    model, tokenizer = load_base(cfg, plan(True, load_model_config(cfg)[0]))
    model = add_lora(model, cfg, backend, plan_targets(model, cfg))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter a part in the forward pass
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.eval()  # the same forward in both passes (no dropout)
    records = generate(0, "train", "positive", 10) + generate(0, "train", "negative", 6)

    def batches(packing: bool):
        data = stage_data(config(packing), records, [], tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            loaded = confirm(plan(packing, model.config), model, None)[0]  # as the trainer confirms it after loading
            trainer = sft_trainer(config(packing), stages_for(cfg)[0], Path(tmp), loaded, model, tokenizer, data)
            # on the model's device, as the Trainer moves them (the check also runs on CUDA: tests/test_gpu.py)
            return trainer, data, [{k: v.to(model.device) for k, v in batch.items()}
                                   for batch in trainer.get_train_dataloader()]

    trainer, packed, packed_batches = batches(True)
    first = packed_batches[0]
    ce = torch.nn.functional.cross_entropy

    def segments(positions):
        """(begin, end) of each example in a row: positions restart at 0 (a padding token is one of its own)."""
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        return list(zip(starts, starts[1:]))

    def token_losses(logits, labels):
        mask = labels[1:] != -100
        return ce(logits[:-1][mask], labels[1:][mask], reduction="none"), int(mask.sum())

    # the trainer's batch as it reaches the model, and the same rows flattened into one padding-free sequence
    # (the layout used with FlashAttention) built from the real tokens of each row
    real = [(b, e) for row in range(first["input_ids"].shape[0])
            for b, e in [(row, seg) for seg in segments(first["position_ids"][row])]
            if (first["labels"][row, e[0]:e[1]] != -100).any()]
    with torch.no_grad():
        logits = model(**{k: v for k, v in first.items() if k != "labels"}).logits
        flat_ids = torch.cat([first["input_ids"][r, b:e] for r, (b, e) in real])[None]
        flat_pos = torch.cat([torch.arange(e - b, device=model.device) for _, (b, e) in real])[None]
        flat_logits = model(input_ids=flat_ids, position_ids=flat_pos).logits[0]
        # the control: one running position over a row lets every example see the ones before it
        leaky = model(input_ids=first["input_ids"]).logits
    worst = worst_flat = leak = 0.0
    trained, at = 0, 0
    for row, (begin, end) in real:
        ids, labels = first["input_ids"][row, begin:end], first["labels"][row, begin:end]
        with torch.no_grad():
            alone, n = token_losses(model(input_ids=ids[None]).logits[0], labels)
        inside, _ = token_losses(logits[row, begin:end], labels)
        flat, _ = token_losses(flat_logits[at:at + end - begin], labels)
        mixed, _ = token_losses(leaky[row, begin:end], labels)
        worst = max(worst, float((inside - alone).abs().max()))
        worst_flat = max(worst_flat, float((flat - alone).abs().max()))
        leak = max(leak, float((mixed - alone).abs().max()))
        trained, at = trained + n, at + end - begin

    def epoch_gradient(trainer, epoch) -> dict:
        model.zero_grad()
        items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in epoch)
        for batch in epoch:
            trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(items)).backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_grad = epoch_gradient(trainer, packed_batches)
    plain_trainer, plain, plain_batches = batches(False)
    plain_grad = epoch_gradient(plain_trainer, plain_batches)
    scale = max(float(g.abs().max()) for g in plain_grad.values())
    grad_diff = max(float((packed_grad[n] - plain_grad[n]).abs().max()) for n in plain_grad) / scale
    return {"backend": backend, "model": model_name, "attention": plan(True, model.config).attention,
            "model_attention": model.config._attn_implementation, "examples_in_first_batch": len(real),
            "rows_in_first_batch": int(first["input_ids"].shape[0]), "collator": type(trainer.data_collator).__name__,
            "trained_tokens_checked": trained, "max_token_loss_diff": worst,
            "max_token_loss_diff_flattened": worst_flat,
            "control_diff_without_restart": leak,
            "packed_batches": len(packed_batches), "plain_batches": len(plain_batches),
            "packed_report": packed.report(), "plain_report": plain.report(),
            "gradient_tensors": len(plain_grad), "same_tensors": sorted(packed_grad) == sorted(plain_grad),
            "max_relative_gradient_diff": grad_diff, "has_attention_mask": "attention_mask" in first}


if __name__ == "__main__":
    for variant in sys.argv[2:]:
        print(RESULT + json.dumps(main(sys.argv[1], *variant.split(":"))), flush=True)
