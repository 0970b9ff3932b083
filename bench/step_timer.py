"""A TrainerCallback that records when each optimizer step ends (for bench/train_throughput.py).

Writes {"launched": $BENCH_T0, "train_begin": t, "steps": [t1, t2, ...],
"num_tokens": [(step, tokens seen), ...], "peak_memory_bytes": n} to $BENCH_TIMES
at the end of training (num_tokens from TRL's logs; peak memory on CUDA only).
With $BENCH_PROFILE set, optimizer steps 3-5 run under torch.profiler and each
op's self CPU time is written there as JSON: what dominates a step, per stack.
Transformers + stdlib only, so every stack can load it: ours via `extra_callbacks=step_timer.StepTimer`, plain
TRL directly, Axolotl through `axolotl_step_timer.StepTimerPlugin`. `run_timed` is the other
side: it launches a training command with those variables set and reads the file back.
"""

import json
import os
import subprocess
import time
from pathlib import Path

from transformers import TrainerCallback

from bench.profile_ops import op_rows
from core.distributed import is_rank_zero

BENCH = Path(__file__).resolve().parent

PROFILE_FROM, PROFILE_STEPS = 2, 3  # after warm-up: steps 3, 4 and 5


class StepTimer(TrainerCallback):
    def __init__(self):
        self.train_begin = None
        self.steps = []
        self.num_tokens = []
        self.profiler = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.time())
        if self.profiler is not None and state.global_step == PROFILE_FROM + PROFILE_STEPS:
            self._stop_profiler()

    def on_step_begin(self, args, state, control, **kwargs):
        if os.environ.get("BENCH_PROFILE") and state.global_step == PROFILE_FROM:
            import torch

            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                                   + ([torch.profiler.ProfilerActivity.CUDA]
                                                      if torch.cuda.is_available() else []))
            self.profiler.start()

    def _stop_profiler(self) -> None:
        self.profiler.stop()
        with open(os.environ["BENCH_PROFILE"], "w") as f:
            json.dump({"steps": PROFILE_STEPS, "ops": op_rows(self.profiler)}, f)
        self.profiler = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.num_tokens.append((state.global_step, logs["num_tokens"]))

    def on_train_end(self, args, state, control, **kwargs):
        import torch

        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        if is_rank_zero() and os.environ.get("BENCH_TIMES"):
            with open(os.environ["BENCH_TIMES"], "w") as f:
                json.dump({"launched": float(os.environ.get("BENCH_T0", "nan")),
                           "train_begin": self.train_begin, "steps": self.steps,
                           "num_tokens": self.num_tokens, "peak_memory_bytes": peak}, f)


def run_timed(cmd: list[str], times: Path, env: dict | None = None,
              profile: Path | None = None) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run a training command whose trainer has a StepTimer (the repository on its PYTHONPATH, so that
    `bench.step_timer.StepTimer` imports); returns the finished process and what the timer wrote (None if nothing)."""
    base = env or os.environ
    path = os.pathsep.join(p for p in (str(BENCH.parent), base.get("PYTHONPATH", "")) if p)
    env = {**base, "BENCH_T0": repr(time.time()), "BENCH_TIMES": str(times), "PYTHONPATH": path,
           **({"BENCH_PROFILE": str(profile)} if profile is not None else {})}
    done = subprocess.run(cmd, cwd=BENCH.parent, env=env, capture_output=True, text=True)
    ok = done.returncode == 0 and times.is_file()
    return done, json.loads(times.read_text()) if ok else None
