"""MLflow logging shared by our trainer and Axolotl: `MLflowLoggerCallback`.

Why not only `report_to="mlflow"`: transformers' MLflowCallback logs the model
config, TrainingArguments and numeric logs, but not the LoRA config, data
identity, generated predictions or the run summary, has no nested runs for
two stages, and stalls or crashes the run when the server goes away. This
callback logs all of that itself (use it *instead* of report_to="mlflow"):

- params: the run's own description (resolved config, LoRA config, data file
  hashes and counts, backend, library versions), flattened, secrets redacted;
- metrics: every numeric value the trainer logs (train, eval, gen_*), per step
  (a value already logged for the same step is not logged again);
- artifacts: gen_metrics/gen_predictions/gen_errors files, config, run summary.

Where: `tracking_uri`, else $MLFLOW_TRACKING_URI, else the sqlite store
`<store_dir>/mlflow.db` (artifacts in `<store_dir>/mlartifacts`); `store_dir`
defaults to `output_dir`. A run with several stages passes its top folder as
`store_dir` to the parent's logger and to every stage's, so there is one store
and the stages' runs nest under the parent (a nested run needs its parent in
the same store); the per-stage files (the spool) stay in each stage's
`output_dir`.

Server trouble never stops training (unless `require=True`):
- a transient failure (connection refused or reset, timeout, HTTP 5xx, 429,
  401/403) is retried with a short backoff, `retry_s` seconds in all
  (default 4, $MLFLOW_LOGGER_RETRY_S); if it still fails (no connection, or
  an error answer while a probe gets no answer either), the logger goes
  offline: one warning, and every record from then on is appended to
  `<output_dir>/mlflow_spool.jsonl`;
- a record the server refuses (an invalid value or name, a changed param:
  4xx; or a request that keeps failing while the server answers a probe) is
  reported in one warning line naming it and skipped, the logger stays
  online; a batch is then sent item by item so that only the refused items
  are lost;
- offline, a log call probes the server again every `reconnect_s` seconds
  (default 30, $MLFLOW_LOGGER_RECONNECT_S); once it answers, the spool is
  replayed into the same run, in order (params, metrics with their original
  steps and timestamps, tags, artifacts, end status), at most a few seconds per
  log call until it is empty, then logging is live again; `end()` makes a last
  attempt. A run whose creation was spooled (server down from the start) is
  created by the replay, with its original start time;
- what is left when the run ends is replayed by
  `python qwen_finetune.py mlflow-replay OUTPUT_DIR` (`callbacks/mlflow_spool.py`).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from callbacks.mlflow_spool import (DEFAULT_EXPERIMENT, SPOOL_NAME, Spool, Store, _brief, _client,
                                    _env_seconds, _jsonable, _now_ms, _warn, drain, with_retries)
from core.distributed import is_rank_zero
from core.redact import redact, redact_text

_NOT_IN_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. :/]")
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value (8000 on recent servers)
DRAIN_SECONDS_PER_CALL = 5.0  # replaying a long spool during training: at most this much per log call
MAX_WARNINGS = 20  # rejection warnings per logger; then one line says that more are not shown


class MLflowUnavailable(RuntimeError):
    """The tracking server cannot be reached and the run requires it."""


def flatten_params(values: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, name + "."))
        else:
            text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:MAX_PARAM_LENGTH]
    return out


def metric_name(name: str) -> str:
    """MLflow rejects metric and param names outside [alphanumerics _ - . space : /], e.g. Axolotl's
    "memory/max_active (GiB)" or the data source "(none)"; one bad name would fail the whole batch."""
    return _NOT_IN_METRIC_NAME.sub("_", name)


# ------------------------------------------------------------------ the logger
class MLflowLogger:
    """The logger, with the trainer hooks of a transformers callback; `MLflowLoggerCallback` below is the
    same class deriving from transformers' TrainerCallback."""

    def __init__(self, output_dir: str | os.PathLike, *, tracking_uri: str | None = None,
                 experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                 params: dict[str, Any] | None = None, parent_run_id: str | None = None,
                 require: bool = False, artifact_globs: tuple[str, ...] = ("gen_metrics_step*.json",
                                                                           "gen_predictions_step*.jsonl",
                                                                           "gen_errors_step*.md"),
                 store_dir: str | os.PathLike | None = None, parent: MLflowLogger | None = None,
                 retry_s: float | None = None, reconnect_s: float | None = None):
        """`parent`: the logger of the parent run (two stages), when its run may not exist yet (created
        by a replay); `parent_run_id` otherwise. `retry_s`: the retries' time budget per call
        ($MLFLOW_LOGGER_RETRY_S, 4); `reconnect_s`: offline, how often a log call probes the server
        ($MLFLOW_LOGGER_RECONNECT_S, 30)."""
        self.output_dir = Path(output_dir)  # this run's own files: the offline spool
        self.store_dir = Path(store_dir) if store_dir is not None else self.output_dir  # the default store's
        self.tracking_uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or f"sqlite:///{(self.store_dir / 'mlflow.db').resolve()}")
        self.experiment = experiment
        self.run_name = run_name
        self.params = params or {}
        self.parent_run_id = parent_run_id
        self.parent = parent
        self.require = require
        self.artifact_globs = artifact_globs
        self.retry_s = _env_seconds(retry_s, "MLFLOW_LOGGER_RETRY_S", 4.0)
        self.reconnect_s = _env_seconds(reconnect_s, "MLFLOW_LOGGER_RECONNECT_S", 30.0)
        self.local_id = uuid.uuid4().hex
        self.run_id: str | None = None
        self.offline = False
        self.spool = Spool(self.output_dir / SPOOL_NAME)
        self.spooled = self.replayed = self.rejected = 0
        self._client = None
        self._store: Store | None = None
        self._started = False
        self._backlog: bool | None = None  # undelivered records in the spool (None: not looked yet)
        self._last_probe = float("-inf")
        self._logged_artifacts: set[str] = set()
        self._last_metric: dict[str, tuple[int, float]] = {}
        self._warnings = 0

    # ----------------------------------------------------------- client
    @property
    def spool_path(self) -> Path:
        return self.spool.path

    def _mlflow_client(self):
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    def _get_store(self) -> Store:
        if self._store is None:
            self._store = Store(self._mlflow_client(), self._artifact_location())
        return self._store

    def _artifact_location(self) -> str | None:
        if self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri:
            return (self.store_dir / "mlartifacts").resolve().as_uri()
        return None  # a tracking server chooses (or proxies) its artifact store

    def _say(self, text: str, *, rejection: bool = False) -> None:
        if rejection:
            self._warnings += 1
            if self._warnings > MAX_WARNINGS:
                if self._warnings == MAX_WARNINGS + 1:
                    _warn("warning: MLflow rejected more records; further rejections are not shown")
                return
        _warn(text)

    def _uri(self) -> str:
        return redact_text(self.tracking_uri)

    # ----------------------------------------------------------- sending
    def _record(self, kind: str, **fields) -> dict:
        return {"kind": kind, "run_id": self.run_id, "local_id": self.local_id, "experiment": self.experiment,
                "time": _now_ms(), **fields}

    def _has_backlog(self) -> bool:
        if self._backlog is None:  # a spool left by an earlier process (a resumed stage): replayed first
            self._backlog = self.spool.path.exists() and self.spool.pending() > 0
        return self._backlog

    def _submit(self, record: dict) -> None:
        """Deliver `record` now, or keep it in the spool (in order, behind what waits there)."""
        if self.offline and time.monotonic() - self._last_probe >= self.reconnect_s:
            self._reconnect()
        if not self.offline and self._has_backlog():
            self._drain(DRAIN_SECONDS_PER_CALL)
        if not self.offline and not self._has_backlog():
            try:
                store = self._get_store()
            except Exception as e:  # e.g. a sqlite store that cannot be opened
                ok, problems, error = False, [], e
            else:
                ok, problems, error = store.deliver_resilient([record], self.retry_s)
            self._learn_run_id()
            self._report(problems)
            if ok:
                return
            if self.require:
                raise MLflowUnavailable(f"MLflow at {self._uri()} failed and require=True: {_brief(error)}")
            self.offline = True
            self._last_probe = time.monotonic()
            self._say(f"warning: MLflow at {self._uri()} is unreachable ({_brief(error)}); training goes on, "
                      f"logging is kept in {self.spool.path} and replayed into the same run when the server "
                      f"answers again (checked every {self.reconnect_s:g}s)")
        self._append(record)

    def _append(self, record: dict) -> None:
        if self.spool._lock_file is None and not self.spool.lock(wait_s=10):
            self._say(f"warning: another process holds {self.spool.lock_path}; spooling anyway")
        if not self.spooled or not self.spool.path.exists():
            record = {**record, "uri": self._uri()}  # where it was going: mlflow-replay's default
        self.spool.append(record)
        self.spooled += 1
        self._backlog = True

    def _report(self, problems: list[str]) -> None:
        for problem in problems:
            self.rejected += 1
            self._say(f"warning: MLflow at {self._uri()} rejected {problem}; skipped, logging goes on",
                      rejection=True)

    def _learn_run_id(self) -> None:
        if self.run_id is None and self._store is not None:
            self.run_id = self._store.runs.get(self.local_id)

    def _reconnect(self) -> bool:
        self._last_probe = time.monotonic()
        try:
            if not self._get_store().answers():
                return False
        except Exception:
            return False
        self.offline = False
        if self._has_backlog():
            self._say(f"MLflow at {self._uri()} answers again: replaying {self.spool.pending()} spooled records "
                      f"from {self.spool.path}")
        return True

    def _drain(self, budget_s: float | None) -> None:
        if self.parent is not None and self.parent is not self and self.parent._backlog:
            self.parent.flush()  # the parent's run first: a stage's creation names it
        if not self.spool.lock(wait_s=10):
            self._say(f"warning: another process is replaying {self.spool.path}; replay here later")
            return
        delivered, rejected, error = drain(self.spool, self._get_store(), retry_s=self.retry_s, budget_s=budget_s,
                                           warn=lambda text: self._say(text, rejection=True))
        self.replayed += delivered
        self.rejected += rejected
        self._learn_run_id()
        if error is not None:
            self.offline = True
            self._last_probe = time.monotonic()
            self._say(f"warning: MLflow at {self._uri()} is unreachable again ({_brief(error)}); "
                      f"{self.spool.pending()} records wait in {self.spool.path}")
        elif not self.spool.path.exists():
            self._backlog = False
            self._say(f"MLflow: {self.replayed} spooled records replayed from {self.spool.path}; logging live again")

    def flush(self) -> None:
        """Try now (whatever the reconnect interval) to deliver everything that waits in the spool."""
        if not is_rank_zero():
            return
        if self.offline:
            self._reconnect()
        if not self.offline and self._has_backlog():
            self._drain(None)

    def spool_counts(self) -> dict[str, int] | None:
        """{"spooled", "replayed", "pending", "rejected"} when the server was unreachable at some point or
        refused something; None otherwise."""
        pending = self.spool.pending() if self.spool.path.exists() else 0
        counts = {"spooled": self.spooled, "replayed": self.replayed, "pending": pending, "rejected": self.rejected}
        return counts if any(counts.values()) else None

    def check(self) -> None:
        """Reach the server now (before minutes of model loading) when it is required."""
        try:
            with_retries(lambda: self._mlflow_client().search_experiments(max_results=1), self.retry_s)
        except Exception as e:
            if self.require:
                raise MLflowUnavailable(f"MLflow at {self._uri()} failed and require=True: {_brief(e)}") from None
            self.offline = True
            self._last_probe = time.monotonic()
            self._say(f"warning: MLflow at {self._uri()} is unreachable ({_brief(e)})")

    # ----------------------------------------------------------- run lifecycle
    def start(self, extra_params: dict | None = None) -> str | None:
        """Create the run (and log params); usable before a trainer exists (parent runs)."""
        if not is_rank_zero() or self._started:
            return self.run_id
        self._started = True
        parent_run_id = self.parent_run_id
        if self.parent is not None and parent_run_id is None:
            if self.parent.run_id is None:
                self.parent.flush()  # the server may be back since the parent started
            parent_run_id = self.parent.run_id
        self._submit(self._record(
            "start", run_name=redact_text(self.run_name) if self.run_name else None, parent_run_id=parent_run_id,
            parent_local_id=self.parent.local_id if self.parent is not None and not parent_run_id else None,
            start_time=_now_ms()))
        self.log_params({**self.params, **(extra_params or {})})
        return self.run_id

    def log_params(self, params: dict) -> None:
        if not params or not is_rank_zero():
            return
        flat = {metric_name(k): v for k, v in flatten_params(redact(params)).items()}
        self._submit(self._record("params", params=flat))

    def log_metrics(self, metrics: dict, step: int) -> None:
        numeric = {metric_name(k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # the same value for the same step (e.g. the final eval, logged by the trainer and in the summary)
        numeric = {k: v for k, v in numeric.items() if self._last_metric.get(k) != (step, v)}
        if not numeric or not is_rank_zero():
            return
        self._last_metric.update({k: (step, v) for k, v in numeric.items()})
        self._submit(self._record("metrics", step=int(step), timestamp=_now_ms(), metrics=numeric))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not path.is_file() or not is_rank_zero():
            return
        self._submit(self._record("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path))

    def log_new_artifacts(self, directory: Path) -> None:
        for pattern in self.artifact_globs:
            for path in sorted(directory.glob(pattern)):
                if str(path) not in self._logged_artifacts:
                    self._logged_artifacts.add(str(path))
                    self.log_artifact(path, "generation_eval")

    def end(self, status: str = "FINISHED", files: tuple[Path, ...] = ()) -> None:
        if not is_rank_zero() or not self._started:
            return
        for path in files:
            self.log_artifact(path)
        self._submit(self._record("end", status=status, end_time=_now_ms()))
        self.flush()  # a last attempt for what waits in the spool
        if self._has_backlog():
            self._say(f"warning: {self.spool.pending()} MLflow records of run {self.run_id or '(not created yet)'} "
                      f"remain in {self.spool.path}; once the server answers, deliver them with "
                      f"`python qwen_finetune.py mlflow-replay {self.store_dir}` (safe to repeat)")
        self.spool.unlock()

    # ----------------------------------------------------------- trainer hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        extra = {}
        peft_config = getattr(model, "peft_config", None)
        if peft_config:
            extra["lora"] = {name: _jsonable(c.to_dict()) for name, c in peft_config.items()}
        self.start(extra)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.log_metrics(logs, state.global_step)
        self.log_new_artifacts(Path(args.output_dir))

    def on_train_end(self, args, state, control, **kwargs):
        self.log_new_artifacts(Path(args.output_dir))


def _trainer_callback():
    from transformers import TrainerCallback

    return TrainerCallback


class MLflowLoggerCallback(MLflowLogger, _trainer_callback()):
    """`MLflowLogger` as a transformers callback (our trainer, Axolotl's plugin)."""
