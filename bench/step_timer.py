"""A TrainerCallback that records when each optimizer step ends (for bench/train_throughput.py).

Writes {"launched": $BENCH_T0, "train_begin": t, "steps": [t1, t2, ...]} to
$BENCH_TIMES at the end of training. Transformers + stdlib only, so every
stack can load it: ours via `extra_callbacks=step_timer.StepTimer`, plain
TRL directly, Axolotl through `axolotl_step_timer.StepTimerPlugin`.
"""

import json
import os
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.train_begin = None
        self.steps = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.time())

    def on_train_end(self, args, state, control, **kwargs):
        if int(os.environ.get("RANK", "0")) == 0 and os.environ.get("BENCH_TIMES"):
            with open(os.environ["BENCH_TIMES"], "w") as f:
                json.dump({"launched": float(os.environ.get("BENCH_T0", "nan")),
                           "train_begin": self.train_begin, "steps": self.steps}, f)
