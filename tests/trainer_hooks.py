"""Test helpers loaded through `extra_callbacks` (tests put this folder on PYTHONPATH).

SlowSteps: SLOW_STEP_SECONDS sleep in each step from global step SLOW_FROM_STEP
(0-based): triggers the stall watchdog, or holds a run at a known point.
KillProcessAt: sends SIGTERM to process group KILL_PGID when global step KILL_AT_STEP ends
(stops a tracking server mid-run).
RecordTrainingState: how the model is trained at each step (checkpointing, mode, padding side).
SlowEvaluationAndSave: SLOW_EVAL_SECONDS in each evaluation and each checkpoint save.
RecordRanks: per rank, the process group's backend and timeout, and how often accelerate copied a
whole state dict (what a checkpoint under DeepSpeed must not do).
RecordStageRelease: whether the optimizers of earlier stages are still alive when a stage starts
(automatic garbage collection off, so only an explicit release frees a reference cycle).
WreckLearningRate: from global step WRECK_FROM_STEP (0-based) on, every optimizer step runs at
learning rate WRECK_LR: a run whose late steps are worse than its early ones.
RecordAdapterAtStart: per stage and rank, the sum of |w| over the LoRA weights when training begins
(which adapter a stage continues).
RecordLosses: every logged training loss, as the process saw it, in <output_dir>/losses_seen.jsonl
(what a killed run had logged before it died).
"""

import gc
import json
import os
import signal
import time
import weakref
from pathlib import Path

from transformers import TrainerCallback


class SlowSteps(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= int(os.environ.get("SLOW_FROM_STEP", "0")):
            time.sleep(float(os.environ.get("SLOW_STEP_SECONDS", "0")))


class KillProcessAt(TrainerCallback):
    """SIGTERM to process group KILL_PGID when step KILL_AT_STEP ends (only in the stage folder named
    KILL_IN_STAGE, when set: a two-stage run counts its steps from 1 again in stage 2)."""

    def on_step_end(self, args, state, control, **kwargs):
        stage = os.environ.get("KILL_IN_STAGE")
        if stage and os.path.basename(os.path.normpath(args.output_dir)) != stage:
            return
        if state.global_step == int(os.environ["KILL_AT_STEP"]):
            os.killpg(int(os.environ["KILL_PGID"]), signal.SIGTERM)
            time.sleep(2)  # let it go down before the next log call


class RecordTrainingState(TrainerCallback):
    """Appends, at the end of every optimizer step (before that step's evaluation), how the model was
    trained in it to <output_dir>/training_state.jsonl: the gradient-checkpointing flags of its modules,
    train mode and the tokenizer's padding side. An evaluation in between must change none of them."""

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        import collections
        import json
        from pathlib import Path

        from torch._dynamo import eval_frame

        flags = collections.Counter(str(m.gradient_checkpointing) for m in model.modules()
                                    if hasattr(m, "gradient_checkpointing"))
        row = {"step": state.global_step, "checkpointing": dict(sorted(flags.items())), "training": model.training,
               "padding_side": processing_class.padding_side, "use_cache": model.config.use_cache,
               "compile_stance": eval_frame._stance.stance}
        with open(Path(args.output_dir) / "training_state.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class EagerStanceInGenerate(TrainerCallback):
    """Does to torch.compile's stance what Unsloth's compiled generate does on a GPU (unsloth_zoo/compiler.py):
    leaves it at eager_on_recompile. On this CPU nothing is compiled, so it is set here, in generate."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        generate = model.generate

        def eager_after(*a, **kw):
            torch.compiler.set_stance("eager_on_recompile")
            return generate(*a, **kw)

        model.generate = eager_after


class SlowEvaluationAndSave(TrainerCallback):
    def on_evaluate(self, args, state, control, **kwargs):
        time.sleep(float(os.environ["SLOW_EVAL_SECONDS"]))

    def on_save(self, args, state, control, **kwargs):
        time.sleep(float(os.environ["SLOW_EVAL_SECONDS"]))


class RecordRanks(TrainerCallback):
    state_dict_copies = 0

    def on_train_begin(self, args, state, control, **kwargs):
        import accelerate

        original = accelerate.Accelerator.get_state_dict
        if not getattr(original, "counted", False):
            def counted(accelerator, *a, **k):
                RecordRanks.state_dict_copies += 1
                return original(accelerator, *a, **k)

            counted.counted = True
            accelerate.Accelerator.get_state_dict = counted

    def on_save(self, args, state, control, **kwargs):
        import torch
        import torch.distributed as dist

        backend = dist.get_backend()
        group = dist.group.WORLD._get_backend(torch.device("cuda" if backend == "nccl" else "cpu"))
        row = {"step": state.global_step, "backend": backend,
               "timeout_s": group.options._timeout.total_seconds(),
               "state_dict_copies": RecordRanks.state_dict_copies}
        with open(Path(args.output_dir) / f"ranks-{os.environ['RANK']}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class RecordStageRelease(TrainerCallback):
    optimizers: list = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        gc.disable()
        alive = [ref() is not None for ref in RecordStageRelease.optimizers]
        RecordStageRelease.optimizers.append(weakref.ref(optimizer))
        with open(Path(args.output_dir) / "earlier_optimizers_alive.json", "w", encoding="utf-8") as f:
            json.dump(alive, f)


class WreckLearningRate(TrainerCallback):
    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step >= int(os.environ["WRECK_FROM_STEP"]):
            for group in optimizer.param_groups:  # the scheduler sets it again after each step
                group["lr"] = float(os.environ["WRECK_LR"])


class RecordAdapterAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        total = sum(float(p.detach().double().abs().sum()) for n, p in model.named_parameters() if "lora_" in n)
        with open(Path(args.output_dir) / f"adapter_at_start-{os.environ.get('RANK', '0')}.json", "w",
                  encoding="utf-8") as f:
            json.dump(total, f)


class HoldNodeAtStep(TrainerCallback):
    """Stops one node's ranks after an optimizer step (HOLD_AT_STEP on node HOLD_NODE) until the test kills
    them: the other node goes on into the next step's collectives, as when a machine dies mid-run."""

    def on_step_end(self, args, state, control, **kwargs):
        from core.distributed import node_rank

        if state.global_step == int(os.environ["HOLD_AT_STEP"]) and node_rank() == int(os.environ["HOLD_NODE"]):
            Path(os.environ["HOLD_FILE"]).write_text(str(os.getpid()), encoding="utf-8")
            time.sleep(600)


class RecordLosses(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            with open(Path(args.output_dir) / "losses_seen.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": state.global_step, "loss": logs["loss"]}) + "\n")
