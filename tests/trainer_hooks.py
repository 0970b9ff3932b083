"""Test helpers loaded through `extra_callbacks` (tests put this folder on PYTHONPATH).

SlowSteps: SLOW_STEP_SECONDS sleep in each step from global step SLOW_FROM_STEP
(0-based): triggers the stall watchdog, or holds a run at a known point.
KillProcessAt: sends SIGTERM to process group KILL_PGID when global step KILL_AT_STEP ends
(stops a tracking server mid-run).
RecordTrainingState: how the model is trained at each step (checkpointing, mode, padding side).
"""

import os
import signal
import time

from transformers import TrainerCallback


class SlowSteps(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= int(os.environ.get("SLOW_FROM_STEP", "0")):
            time.sleep(float(os.environ.get("SLOW_STEP_SECONDS", "0")))


class KillProcessAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
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

        flags = collections.Counter(str(m.gradient_checkpointing) for m in model.modules()
                                    if hasattr(m, "gradient_checkpointing"))
        row = {"step": state.global_step, "checkpointing": dict(sorted(flags.items())), "training": model.training,
               "padding_side": processing_class.padding_side}
        with open(Path(args.output_dir) / "training_state.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
