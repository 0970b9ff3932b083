"""Test helpers loaded through `extra_callbacks` (tests put this folder on PYTHONPATH).

SlowSteps: SLOW_STEP_SECONDS sleep in each step from global step SLOW_FROM_STEP
(0-based): triggers the stall watchdog, or holds a run at a known point.
KillProcessAt: sends SIGTERM to process group KILL_PGID when global step KILL_AT_STEP ends
(stops a tracking server mid-run).
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
