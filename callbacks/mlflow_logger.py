"""MLflow logging shared by our trainer and Axolotl: `MLflowLoggerCallback`.

Why not only `report_to="mlflow"`: transformers' MLflowCallback logs the model
config, TrainingArguments and numeric logs, but not the LoRA config, data
identity, generated predictions or the run summary, has no nested runs for
two stages, and stalls or crashes the run when the server goes away. This
callback logs all of that itself (use it *instead* of report_to="mlflow"):

- params: the run's own description (resolved config, LoRA config, data file
  hashes and counts, backend, library versions), flattened, secrets redacted;
- metrics: every numeric value the trainer logs (train, eval, gen_*), per step;
- artifacts: gen_metrics/gen_predictions files, config, run summary.

Where: `tracking_uri`, else $MLFLOW_TRACKING_URI, else the sqlite store
`<store_dir>/mlflow.db` (artifacts in `<store_dir>/mlartifacts`); `store_dir`
defaults to `output_dir`. A run with several stages passes its top folder as
`store_dir` to the parent's logger and to every stage's, so there is one store
and the stages' runs nest under the parent (a nested run needs its parent in
the same store); the per-stage files (the spool) stay in each stage's
`output_dir`.

Server trouble never stops training (unless `require=True`): the first failed
call switches the logger offline, prints one warning, and everything after
that is appended to `<output_dir>/mlflow_spool.jsonl`. Rank 0 only.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from callbacks.redact import redact, redact_text

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object

SPOOL_NAME = "mlflow_spool.jsonl"
_NOT_IN_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. :/]")
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value (8000 on recent servers)


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
    "memory/max_active (GiB)" or the data source "(none)"; one bad name would fail the whole batch
    (and switch the logger offline)."""
    return _NOT_IN_METRIC_NAME.sub("_", name)


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class MLflowLoggerCallback(TrainerCallback):
    def __init__(self, output_dir: str | os.PathLike, *, tracking_uri: str | None = None,
                 experiment: str = "qwen-finetune", run_name: str | None = None,
                 params: dict[str, Any] | None = None, parent_run_id: str | None = None,
                 require: bool = False, artifact_globs: tuple[str, ...] = ("gen_metrics_step*.json",
                                                                           "gen_predictions_step*.jsonl"),
                 store_dir: str | os.PathLike | None = None):
        self.output_dir = Path(output_dir)  # this run's own files: the offline spool
        self.store_dir = Path(store_dir) if store_dir is not None else self.output_dir  # the default store's
        self.tracking_uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or f"sqlite:///{(self.store_dir / 'mlflow.db').resolve()}")
        self.experiment = experiment
        self.run_name = run_name
        self.params = params or {}
        self.parent_run_id = parent_run_id
        self.require = require
        self.artifact_globs = artifact_globs
        self.run_id: str | None = None
        self.offline = False
        self._client = None
        self._logged_artifacts: set[str] = set()

    # ----------------------------------------------------------- client
    @property
    def spool_path(self) -> Path:
        return self.output_dir / SPOOL_NAME

    def _mlflow_client(self):
        if self._client is None:
            # Fail in seconds, not minutes of retries, when the server is gone.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            from mlflow import MlflowClient

            if self.tracking_uri.startswith("sqlite:///"):  # sqlite creates the file, not its folder
                Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _send(self, kind: str, payload: dict, action) -> None:
        """Run `action` against the server, or spool `payload` when offline / on failure."""
        if not self.offline:
            try:
                action()
                return
            except Exception as e:  # any transport or server error: keep training
                if self.require:
                    raise MLflowUnavailable(f"MLflow at {redact_text(self.tracking_uri)} failed and "
                                            f"require=True: {type(e).__name__}: {redact_text(str(e))[:300]}") from None
                self.offline = True
                print(f"warning: MLflow at {redact_text(self.tracking_uri)} is unreachable "
                      f"({type(e).__name__}: {redact_text(str(e))[:300]}); training goes on, "
                      f"logging is kept in {self.spool_path}",
                      file=sys.stderr, flush=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.spool_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "run_id": self.run_id, **redact(payload)},
                               ensure_ascii=False, default=str) + "\n")

    def check(self) -> None:
        """Reach the server now (before minutes of model loading) when it is required."""
        self._send("check", {}, lambda: self._mlflow_client().search_experiments(max_results=1))

    # ----------------------------------------------------------- run lifecycle
    def start(self, extra_params: dict | None = None) -> str | None:
        """Create the run (and log params); usable before a trainer exists (parent runs)."""
        if not _is_rank_zero() or self.run_id is not None:
            return self.run_id

        def create():
            client = self._mlflow_client()
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                self.experiment, artifact_location=self._artifact_location())
            tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
            self.run_id = client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id

        self._send("start", {"experiment": self.experiment, "run_name": self.run_name}, create)
        self.log_params({**self.params, **(extra_params or {})})
        return self.run_id

    def _artifact_location(self) -> str | None:
        if self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri:
            return (self.store_dir / "mlartifacts").resolve().as_uri()
        return None  # a tracking server chooses (or proxies) its artifact store

    def log_params(self, params: dict) -> None:
        if not params or not _is_rank_zero():
            return
        from mlflow.entities import Param

        flat = {metric_name(k): v for k, v in flatten_params(redact(params)).items()}

        def send():
            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self._mlflow_client().log_batch(self.run_id, params=items[i:i + 100])

        self._send("params", {"params": flat}, send)

    def log_metrics(self, metrics: dict, step: int) -> None:
        numeric = {metric_name(k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numeric or not _is_rank_zero():
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._send("metrics", {"step": step, "metrics": numeric}, lambda: self._mlflow_client().log_batch(
            self.run_id, metrics=[Metric(k, v, now, step) for k, v in numeric.items()]))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not path.is_file() or not _is_rank_zero():
            return
        self._send("artifact", {"path": str(path), "artifact_path": artifact_path},
                   lambda: self._mlflow_client().log_artifact(self.run_id, str(path), artifact_path))

    def log_new_artifacts(self, directory: Path) -> None:
        for pattern in self.artifact_globs:
            for path in sorted(directory.glob(pattern)):
                if str(path) not in self._logged_artifacts:
                    self._logged_artifacts.add(str(path))
                    self.log_artifact(path, "generation_eval")

    def end(self, status: str = "FINISHED", files: tuple[Path, ...] = ()) -> None:
        if not _is_rank_zero() or self.run_id is None and not self.offline:
            return
        for path in files:
            self.log_artifact(path)
        self._send("end", {"status": status}, lambda: self._mlflow_client().set_terminated(self.run_id, status))

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


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
