"""A stall watchdog: when no optimizer step completes in time, dump every
thread's Python stack (faulthandler) and keep running.

The user's Axolotl run sat at "0%" for minutes with nothing on screen; with
this callback such a run writes where each rank is waiting (a compile, a
collective, a per-expert loop) instead. It also records how long the first
optimizer step took, the start-up cost users most often misread as a hang.
Depends only on transformers and the stdlib, so Axolotl can load it too.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback


class StallWatchdog(TrainerCallback):
    def __init__(self, first_step_timeout_s: float = 600.0, step_timeout_s: float = 300.0,
                 log_dir: str | os.PathLike | None = None):
        self.first_step_timeout_s = first_step_timeout_s
        self.step_timeout_s = step_timeout_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.first_step_s: float | None = None
        self.dumps = 0
        self._deadline = None
        self._train_start = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # --------------------------------------------------------------- hooks
    def on_train_begin(self, args, state, control, **kwargs):
        self._train_start = time.monotonic()
        self._arm(self.first_step_timeout_s, state.global_step)
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None and self._train_start is not None:
            self.first_step_s = time.monotonic() - self._train_start
        self._arm(self.step_timeout_s, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._stop.set()

    # --------------------------------------------------------------- internals
    def _arm(self, timeout_s: float, step: int) -> None:
        with self._lock:
            self._deadline = (time.monotonic() + timeout_s, timeout_s, step)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.step_timeout_s / 4, self.first_step_timeout_s / 4)):
            with self._lock:
                deadline, timeout_s, step = self._deadline
            if time.monotonic() < deadline:
                continue
            self._dump(timeout_s, step)
            self._arm(timeout_s, step)  # dump again if it stays stuck, but keep running

    def _dump(self, timeout_s: float, step: int) -> None:
        rank = int(os.environ.get("RANK", "0"))
        what = "first optimizer step" if step == 0 else f"optimizer step {step + 1}"
        header = (f"\n[watchdog rank {rank}] no {what} finished within {timeout_s:.0f}s; "
                  f"Python stacks of every thread follow (training keeps running)\n")
        self.dumps += 1
        targets = [sys.stderr]
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            targets.append(open(self.log_dir / f"watchdog-rank{rank}.log", "a", encoding="utf-8"))
        for f in targets:
            f.write(header)
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
        for f in targets[1:]:
            f.close()
