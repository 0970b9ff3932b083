"""The best step of a stage, chosen on the user's metrics (finetune/selection.py), kept as its adapter.

At each evaluation rank 0 (the only rank holding the generation metrics) scores the step and saves an
improving step's adapter as `<stage>/adapter_best/` (written aside, then renamed). When the stage ends,
`adapter/` is that step's adapter and `adapter_last/` the last step's; the evaluations and the choice
are in `best.json` and the run summary. `--resume` keeps what was chosen up to the checkpoint it
resumes from; the evaluations after it run again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback

from core.distributed import is_rank_zero
from core.metrics import lower_is_better
from core.records import atomic_write_text, replace_dir
from finetune.selection import Constraint, choose, improves

SELECTION_FILE = "selection.json"  # inside adapter_best/: the step that folder holds


class BestAdapterCallback(TrainerCallback):
    """Keeps the best step's adapter of one stage (see the module doc). `trainer` is set by the owner:
    the adapter is saved through `trainer.save_model`, the path the end of the stage takes too."""

    def __init__(self, metric: str, constraints: list[Constraint], out_dir: Path, resume_step: int | None = None):
        self.metric = metric
        self.constraints = list(constraints)
        self.lower = lower_is_better(metric)
        self.out = Path(out_dir)
        self.evaluations: list[dict] = []
        self.best: dict | None = None
        self.trainer = None
        self._step_logs: tuple[int, dict] = (-1, {})
        if is_rank_zero():
            self._restore(resume_step)

    @property
    def best_dir(self) -> Path:
        return self.out / "adapter_best"

    def _restore(self, resume_step: int | None) -> None:
        """What an interrupted run chose up to the checkpoint it resumes from; a fresh run starts clean.
        A step kept after that checkpoint is dropped (its evaluation runs again); the history before it
        is kept only when it still agrees with the folder held, so `best` is always `choose(evaluations)`."""
        history, held = self.out / "best.json", self.best_dir / SELECTION_FILE
        finished = self.out / "adapter" / SELECTION_FILE
        if resume_step is not None and not held.is_file() and finished.is_file():
            # killed after finish() moved the choice into adapter/ but before the stage was marked complete
            shutil.rmtree(self.best_dir, ignore_errors=True)
            os.replace(self.out / "adapter", self.best_dir)
        if resume_step is not None and history.is_file():
            saved = json.loads(history.read_text(encoding="utf-8"))
            if saved.get("metric") == self.metric and saved.get("constraints") == [str(c) for c in self.constraints]:
                earlier = [e for e in saved["evaluations"] if e["step"] <= resume_step]
                kept = json.loads(held.read_text(encoding="utf-8")) if held.is_file() else None
                if choose(earlier, self.lower) == kept:
                    self.evaluations, self.best = earlier, kept
        if self.best is None:
            shutil.rmtree(self.best_dir, ignore_errors=True)
        if not self.evaluations:
            history.unlink(missing_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step, seen = self._step_logs
        if step != state.global_step:  # eval_loss and the gen_* metrics of one step arrive in separate logs
            step, seen = state.global_step, {}
            self._step_logs = (step, seen)
        seen.update(logs)
        needed = [self.metric, *(c.metric for c in self.constraints)]
        if any(k not in seen for k in needed) or any(e["step"] == step for e in self.evaluations):
            return
        row = {"step": step, "value": seen[self.metric],
               "constraints": {str(c): seen[c.metric] for c in self.constraints},
               "met": all(c.holds(seen) for c in self.constraints)}
        self.evaluations.append(row)
        if row["met"] and improves(row["value"], self.best["value"] if self.best else None, self.lower):
            self._keep(row)
        self._write_history()

    def _keep(self, row: dict) -> None:
        staged = self.out / "adapter_best.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        self.trainer.save_model(str(staged))
        self.trainer.processing_class.save_pretrained(str(staged))
        atomic_write_text(staged / SELECTION_FILE, [json.dumps(row, ensure_ascii=False)])
        replace_dir(staged, self.best_dir)
        self.best = row

    def _write_history(self) -> None:
        atomic_write_text(self.out / "best.json", [json.dumps(
            {"metric": self.metric, "lower_is_better": self.lower,
             "constraints": [str(c) for c in self.constraints], "best": self.best,
             "evaluations": self.evaluations}, indent=2, ensure_ascii=False)])

    def finish(self, last_step: int) -> dict:
        """Rank 0, after training: adapter_last/ = the last step, adapter/ = the chosen one (the last
        step when no evaluation qualified). Returns the run summary's `best` entry."""
        last = self.out / "adapter_last"
        shutil.rmtree(last, ignore_errors=True)
        self.trainer.save_model(str(last))
        self.trainer.processing_class.save_pretrained(str(last))
        adapter = self.out / "adapter"
        if self.best is not None:  # its selection.json stays: which step adapter/ holds
            replace_dir(self.best_dir, adapter)
        else:
            staged = self.out / "adapter.tmp"
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(last, staged)
            replace_dir(staged, adapter)
        self._write_history()
        return self.summary(last_step)

    def summary(self, last_step: int) -> dict:
        last = next((e for e in self.evaluations if e["step"] == last_step), None)
        return {"metric": self.metric, "lower_is_better": self.lower,
                "constraints": [str(c) for c in self.constraints],
                "step": self.best["step"] if self.best else None, "value": self.best["value"] if self.best else None,
                "last_step": last_step, "last_value": last["value"] if last else None,
                "evaluations": list(self.evaluations), "adapter_step": self.best["step"] if self.best else last_step}
