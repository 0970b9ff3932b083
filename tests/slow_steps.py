"""Test helper loaded through `extra_callbacks`: makes training steps slow on purpose.

SLOW_STEP_SECONDS: how long each step sleeps; SLOW_FROM_STEP: the first global
step (0-based) that sleeps. Used to trigger the stall watchdog and to kill a
run mid-stage at a known point.
"""

import os
import time

from transformers import TrainerCallback


class SlowSteps(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= int(os.environ.get("SLOW_FROM_STEP", "0")):
            time.sleep(float(os.environ.get("SLOW_STEP_SECONDS", "0")))
