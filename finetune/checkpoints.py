"""Checkpoints that hold the adapter, not the base model, under DeepSpeed ZeRO-2 as under DDP.

transformers' `Trainer.save_model` under DeepSpeed stages 0-2 asks accelerate for the
full state dict, which clones every weight of the unwrapped model to host memory on
every rank (`accelerate.Accelerator.get_state_dict`): ~61 GB per rank for
Qwen3-30B-A3B at each checkpoint, only for PEFT to keep the LoRA tensors of it.
Below ZeRO-3 every rank holds whole parameters, so rank 0 can save the adapter
straight from the module, as transformers already does without DeepSpeed. The
optimizer, scheduler and RNG states that `--resume` needs are saved by transformers
as before (DeepSpeed's engine checkpoint, frozen parameters excluded), and read back on
CPU-only multi-process runs too (see `_load_optimizer_and_scheduler`).
"""

from __future__ import annotations


def adapter_checkpoints(trainer_class):
    """`trainer_class` whose `save_model` saves only the adapter when DeepSpeed shards no parameters."""

    class AdapterCheckpointTrainer(trainer_class):
        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            if not (self.is_deepspeed_enabled and _is_peft(self.model) and _zero_stage(self) < 3):
                return super().save_model(output_dir, _internal_call)
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir)  # PEFT's save_pretrained: adapter weights only

        def _load_optimizer_and_scheduler(self, checkpoint):
            device = self.args.device
            if checkpoint is None or device.type != "cpu" or device.index is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            # Several CPU processes (gloo, e.g. two nodes without GPUs): accelerate names each process's
            # device "cpu:N" and transformers maps the resumed optimizer state to it, which torch.load
            # refuses ("don't know how to restore data location ... cpu:0"); "cpu" is the same memory.
            import torch

            load = torch.load
            torch.load = lambda *a, **k: load(*a, **{**k, "map_location": "cpu"})
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                torch.load = load

    AdapterCheckpointTrainer.__name__ = AdapterCheckpointTrainer.__qualname__ = \
        f"AdapterCheckpoint{trainer_class.__name__}"
    return AdapterCheckpointTrainer


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _zero_stage(trainer) -> int:
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage)  # set from construction on
