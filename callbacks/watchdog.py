"""A stall watchdog: when no optimizer step completes in time, dump every
thread's Python stack (faulthandler) and keep running.

The user's Axolotl run sat at "0%" for minutes with nothing on screen; with
this callback such a run writes where each rank is waiting (a compile, a
collective, a per-expert loop) instead. It also records how long the first
optimizer step took, the start-up cost users most often misread as a hang.

Steps and pauses have their own limits: evaluations and checkpoint saves
(minutes on a 30B model, far longer than a step) get `pause_timeout_s`, so a
routine evaluation raises no alarm and a hung one (a collective in the
generation eval) still does. Their durations are kept in `pauses`. Put it
last among the callbacks so a pause covers the other callbacks' evaluation
work (the generation eval runs in `on_evaluate`).
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

from core.distributed import rank


class StallWatchdog(TrainerCallback):
    def __init__(self, first_step_timeout_s: float = 600.0, step_timeout_s: float = 300.0,
                 log_dir: str | os.PathLike | None = None, pause_timeout_s: float = 3600.0):
        self.first_step_timeout_s = first_step_timeout_s
        self.step_timeout_s = step_timeout_s
        self.pause_timeout_s = pause_timeout_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.first_step_s: float | None = None
        self.dumps = 0
        self.pauses: list[dict] = []  # {"step", "evaluation_s", "save_s"}, one per evaluated/saved step
        self._pause = None  # the pause in progress: (its row, when its current part began)
        self._deadline = None  # (monotonic deadline, timeout_s, what should have finished)
        self._train_start = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # --------------------------------------------------------------- hooks
    def on_train_begin(self, args, state, control, **kwargs):
        self._train_start = time.monotonic()
        self._arm(self.first_step_timeout_s, "first optimizer step" if state.global_step == 0
                  else f"optimizer step {state.global_step + 1}")
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._pause is not None:  # an evaluation or save ended without its closing hook
            self._end_pause(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None and self._train_start is not None:
            self.first_step_s = time.monotonic() - self._train_start
        # The trainer's flow callback (always first) has already decided what follows this step.
        if control.should_evaluate or control.should_save:
            self._pause = ({"step": state.global_step, "evaluation_s": 0.0, "save_s": 0.0}, time.monotonic())
            self.pauses.append(self._pause[0])
            what = "evaluation" if control.should_evaluate else "checkpoint save"
            self._arm(self.pause_timeout_s, f"{what} after optimizer step {state.global_step}")
        else:  # the next deadline covers fetching the next batches too
            self._arm(self.step_timeout_s, f"optimizer step {state.global_step + 1}")

    def on_evaluate(self, args, state, control, **kwargs):
        if self._pause is None:  # an evaluation outside training steps (e.g. trainer.evaluate())
            return
        row, began = self._pause
        row["evaluation_s"] += round(time.monotonic() - began, 3)
        if control.should_save:
            self._pause = (row, time.monotonic())
            self._arm(self.pause_timeout_s, f"checkpoint save after optimizer step {state.global_step}")
        else:
            self._end_pause(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self._pause is None:
            return
        row, began = self._pause
        row["save_s"] += round(time.monotonic() - began, 3)
        self._end_pause(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._stop.set()

    def pause_totals(self) -> dict[str, tuple[int, float]]:
        """{"evaluations" | "checkpoint_saves": (count, seconds)} over the run."""
        evals = [p["evaluation_s"] for p in self.pauses if p["evaluation_s"]]
        saves = [p["save_s"] for p in self.pauses if p["save_s"]]
        return {"evaluations": (len(evals), round(sum(evals), 2)),
                "checkpoint_saves": (len(saves), round(sum(saves), 2))}

    # --------------------------------------------------------------- internals
    def _arm(self, timeout_s: float, what: str) -> None:
        with self._lock:
            self._deadline = (time.monotonic() + timeout_s, timeout_s, what)

    def _end_pause(self, step: int) -> None:
        self._pause = None
        self._arm(self.step_timeout_s, f"optimizer step {step + 1}")

    def _watch(self) -> None:
        limits = (self.step_timeout_s, self.first_step_timeout_s, self.pause_timeout_s)
        while not self._stop.wait(min(1.0, *(t / 4 for t in limits))):
            with self._lock:
                armed = self._deadline
            if time.monotonic() < armed[0]:
                continue
            self._dump(armed[1], armed[2])
            with self._lock:
                if self._deadline is armed:  # still stuck on the same thing: dump again later, keep running
                    self._deadline = (time.monotonic() + armed[1], armed[1], armed[2])

    def _dump(self, timeout_s: float, what: str) -> None:
        header = (f"\n[watchdog rank {rank()}] no {what} finished within {timeout_s:.0f}s; "
                  f"Python stacks of every thread follow (training keeps running)\n")
        self.dumps += 1
        targets = [sys.stderr]
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            targets.append(open(self.log_dir / f"watchdog-rank{rank()}.log", "a", encoding="utf-8"))
        for f in targets:
            f.write(header)
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
        for f in targets[1:]:
            f.close()
