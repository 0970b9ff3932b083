"""The MLflow spool and its replay: what `callbacks/mlflow_logger.py` writes while the tracking
server is unreachable, and how it reaches the same run later (live, once the server answers again,
or with `python qwen_finetune.py mlflow-replay OUTPUT_DIR`, `replay_main` here). Imports neither
transformers nor torch, so the replay command starts at once.

Nothing is delivered twice, nothing is lost: every record carries the run's id
(or, before the run exists, the logger's `local_id`, also set as the run's tag
`qwen_finetune.local_id`, so a replay finds a run it created before instead of
creating another); after each delivered batch the byte offset reached is
written atomically to `mlflow_spool.jsonl.offset` (with a hash of the spool's
first line, so an offset never applies to another spool), and a fully
delivered spool is deleted. A crash between a delivery and its offset resends
that one batch, which is harmless: metrics keep their original timestamps and
MLflow's SQL stores ignore an identical metric row, params and tags are set to
the same value, artifacts overwritten. A process holds the lock
`mlflow_spool.jsonl.lock` while it spools or replays, so a replay never runs
under a live run. Rank 0 only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from core.redact import REDACTED, redact_text

SPOOL_NAME = "mlflow_spool.jsonl"
LOCAL_ID_TAG = "qwen_finetune.local_id"
DEFAULT_EXPERIMENT = "qwen-finetune"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100


class Rejected(Exception):
    """A record that cannot be delivered whatever the server's state (its run was never created, its
    file is gone): reported and skipped like a value the server refuses."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _env_seconds(value: float | None, name: str, default: float) -> float:
    if value is not None:
        return float(value)
    return float(os.environ.get(name) or default)


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _brief(e: BaseException) -> str:
    code = getattr(e, "error_code", None)
    text = redact_text(str(e)).replace("\n", " ")
    return f"{code or type(e).__name__}: {text[:300]}"


# ------------------------------------------------------------------ failures
def is_transient(e: BaseException) -> bool:
    """Worth retrying and spooling: the server is down, slow, overloaded or refuses our credentials
    (fixable, then replayable). Not: a request it refuses (400, 404, 409: an invalid value or name, a
    changed param, a missing run), a local problem (`Rejected`) or a bug in the caller (TypeError...)."""
    if isinstance(e, Rejected):
        return False
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()
    if MlflowException and isinstance(e, MlflowException):
        if e.error_code in ("INVALID_STATE", "DATA_LOSS", "NOT_IMPLEMENTED"):
            return False  # "500"s that no retry changes
        status = e.get_http_status_code()
        return status >= 500 or status in (401, 403, 408, 429)
    response = getattr(e, "response", None)  # requests.HTTPError (artifact uploads)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status in (401, 403, 408, 429)
    return isinstance(e, (OSError, TimeoutError, ConnectionError))  # requests' errors are OSErrors


def _no_connection(e: BaseException) -> bool:
    """The request never got an answer (refused, reset, timed out): the server is unreachable, no probe
    needed to tell (a probe of a hanging server costs another timeout)."""
    if isinstance(e, (OSError, TimeoutError)) and not hasattr(e, "response"):
        return True
    return bool(re.match(r"API request to \S+ failed with (timeout )?exception", str(e)))


def with_retries(action: Callable[[], Any], budget_s: float, first_delay_s: float = 0.25):
    """`action()`, retried on a transient failure with a doubling delay while the delays fit in
    `budget_s` seconds (4 s: waits of 0.25, 0.5, 1 and 2 s); the last failure is raised."""
    deadline = time.monotonic() + budget_s
    delay = first_delay_s
    while True:
        try:
            return action()
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay *= 2


# ------------------------------------------------------------------ the spool file
class Spool:
    """`mlflow_spool.jsonl`: records not delivered yet, one JSON object a line, appended; beside it
    `.offset`: {"head": sha256 of the first line, "bytes": offset delivered up to, "lines": count}, and
    `.lock`, held by the process that spools into it or replays it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset_path = self.path.with_name(self.path.name + ".offset")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_file = None

    # -- lock
    def lock(self, wait_s: float = 0.0) -> bool:
        """Take the lock (held until `unlock`); False when another process holds it after `wait_s`."""
        if self._lock_file is not None:
            return True
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "a+")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    f.close()
                    return False
                time.sleep(0.2)
        self._lock_file = f
        return True

    def unlock(self) -> None:
        if self._lock_file is not None:
            if not self.path.exists():  # nothing left to guard (removed while held: no one else had it)
                with contextlib.suppress(OSError):
                    self.lock_path.unlink()
            self._lock_file.close()
            self._lock_file = None

    # -- writing
    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            if f.tell() > 0:  # a line cut short by a crash stays a line of its own
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    # -- reading and delivery progress
    def _head(self) -> str | None:
        try:
            with open(self.path, "rb") as f:
                return hashlib.sha256(f.readline()).hexdigest()
        except FileNotFoundError:
            return None

    def delivered(self) -> tuple[int, int]:
        """(bytes, lines) of this spool already delivered; (0, 0) when the offset file belongs to
        another spool (the hash of the first line differs) or is missing."""
        try:
            state = json.loads(self.offset_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return 0, 0
        if state.get("head") != self._head():
            return 0, 0
        return int(state.get("bytes", 0)), int(state.get("lines", 0))

    def commit(self, offset: int, lines: int) -> None:
        tmp = self.offset_path.with_name(self.offset_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"head": self._head(), "bytes": offset, "lines": lines}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.offset_path)

    def records(self) -> Iterator[tuple[int, int, dict | None]]:
        """(offset after the line, its line count, the record or None when unreadable) of every line not
        delivered yet; empty lines are skipped (counted)."""
        offset, lines = self.delivered()
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(offset)
            for raw in f:
                offset += len(raw)
                lines += 1
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    # a spool written before records named their logger: one logger per file
                    record.setdefault("local_id", "spool-" + hashlib.sha256(str(self.path).encode()).hexdigest()[:16])
                    yield offset, lines, record
                else:
                    yield offset, lines, None

    def pending(self) -> int:
        """Records not delivered yet."""
        return sum(1 for _ in self.records())

    def finish(self) -> bool:
        """Remove a fully delivered spool (then its offset file); True when none is left."""
        if not self.path.exists():
            return True
        offset, _ = self.delivered()
        if offset < self.path.stat().st_size:
            return False
        self.path.unlink()  # first: an orphan offset file never matches another spool's first line
        with contextlib.suppress(FileNotFoundError):
            self.offset_path.unlink()
        return True


# ------------------------------------------------------------------ delivery to one store
def _describe(record: dict) -> str:
    kind = record.get("kind")
    return {"start": "the run's creation", "end": f"the run's end status {record.get('status')}",
            "artifact": f"artifact {record.get('path')}"}.get(kind, f"{kind} record")


class Store:
    """Delivers spool-shaped records to one tracking store. A record names its run by `run_id`, or (created
    while the server was down) by the logger's `local_id`, found again through the run's tag."""

    def __init__(self, client, artifact_location: str | None = None):
        self.client = client
        self.artifact_location = artifact_location  # for an experiment created here (local stores)
        self.runs: dict[str, str] = {}  # local_id -> run_id
        self._experiments: dict[str, str] = {}

    def answers(self) -> bool:
        try:
            self.client.search_experiments(max_results=1)
            return True
        except Exception:
            return False

    def experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiments[name] = self.client.create_experiment(
                        name, artifact_location=self.artifact_location)
                    return self._experiments[name]
                except Exception as e:
                    if is_transient(e):
                        raise
                    exp = self.client.get_experiment_by_name(name)  # created meanwhile by another process
                    if exp is None:
                        raise
            self._experiments[name] = exp.experiment_id
        return self._experiments[name]

    def find_run(self, local_id: str, experiment: str) -> str | None:
        if local_id in self.runs:
            return self.runs[local_id]
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = self.client.search_runs([exp.experiment_id], filter_string=f"tags.`{LOCAL_ID_TAG}` = '{local_id}'",
                                       max_results=1)
        if runs:
            self.runs[local_id] = runs[0].info.run_id
            return self.runs[local_id]
        return None

    def run_of(self, record: dict) -> str:
        run_id = record.get("run_id") or self.find_run(record.get("local_id", ""),
                                                       record.get("experiment") or DEFAULT_EXPERIMENT)
        if not run_id:
            raise Rejected("its run was never created (the spool has no record of its start)")
        return run_id

    def deliver(self, records: list[dict], lenient: bool = False) -> list[str]:
        """Send `records`: several metrics records of one run, or one record. Returns what was rejected,
        each item named (everything else was delivered); raises a transient failure. `lenient`: the
        server answers but this request keeps failing: every failure counts as a rejection."""
        kind = records[0].get("kind")
        try:
            if kind == "metrics":
                from mlflow.entities import Metric

                run_id = self.run_of(records[0])
                items = [Metric(k, float(v), int(r.get("timestamp") or r.get("time") or _now_ms()), int(r["step"]))
                         for r in records for k, v in r["metrics"].items()]
                return self._batches(items, MAX_METRICS_PER_BATCH,
                                     lambda chunk: self.client.log_batch(run_id, metrics=chunk),
                                     lambda m: f"metric '{m.key}' at step {m.step}", lenient)
            if kind == "params":
                from mlflow.entities import Param

                run_id = self.run_of(records[0])
                items = [Param(k, str(v)) for k, v in records[0]["params"].items()]
                return self._batches(items, MAX_PARAMS_PER_BATCH,
                                     lambda chunk: self.client.log_batch(run_id, params=chunk),
                                     lambda p: f"param '{p.key}'", lenient)
            if kind == "start":
                self._start(records[0])
            elif kind == "artifact":
                path = Path(records[0]["path"])
                if not path.is_file():
                    raise Rejected("the file is gone")
                self.client.log_artifact(self.run_of(records[0]), str(path), records[0].get("artifact_path"))
            elif kind == "end":
                self.client.set_terminated(self.run_of(records[0]), records[0].get("status") or "FINISHED",
                                           end_time=records[0].get("end_time"))
            return []  # an unknown kind (e.g. an old spool's "check"): nothing to deliver
        except Exception as e:
            if is_transient(e) and not lenient:
                raise
            return [f"{_describe(records[0])} ({_brief(e)})"]

    def _start(self, record: dict) -> None:
        local_id = record["local_id"]
        experiment = record.get("experiment") or DEFAULT_EXPERIMENT
        if self.find_run(local_id, experiment):  # created before (a replay cut short, a lost answer)
            return
        tags = {LOCAL_ID_TAG: local_id}
        parent = record.get("parent_run_id") or (record.get("parent_local_id")
                                                 and self.find_run(record["parent_local_id"], experiment))
        if parent:
            tags["mlflow.parentRunId"] = parent
        self.runs[local_id] = self.client.create_run(
            self.experiment_id(experiment), start_time=record.get("start_time"), tags=tags,
            run_name=record.get("run_name")).info.run_id

    @staticmethod
    def _batches(items: list, size: int, send: Callable[[list], Any], name: Callable[[Any], str],
                 lenient: bool) -> list[str]:
        rejected = []
        for i in range(0, len(items), size):
            chunk = items[i:i + size]
            try:
                send(chunk)
                continue
            except Exception as e:
                if is_transient(e) and not lenient:
                    raise
                if len(chunk) == 1:
                    rejected.append(f"{name(chunk[0])} ({_brief(e)})")
                    continue
            for item in chunk:  # one refused item fails the whole batch: find it, deliver the others
                try:
                    send([item])
                except Exception as e:
                    if is_transient(e) and not lenient:
                        raise
                    rejected.append(f"{name(item)} ({_brief(e)})")
        return rejected

    def deliver_resilient(self, records: list[dict], retry_s: float) -> tuple[bool, list[str], Exception | None]:
        """(delivered or rejected: True / the server is unreachable: False, rejections, the failure).
        A request that keeps failing while the server answers a probe is rejected, not spooled forever."""
        try:
            return True, with_retries(lambda: self.deliver(records), retry_s), None
        except Exception as e:
            if _no_connection(e) or not self.answers():
                return False, [], e
            return True, self.deliver(records, lenient=True), None


def _group_key(record: dict | None):
    if record is None or record.get("kind") != "metrics":
        return None
    return ("metrics", record.get("run_id") or record.get("local_id"))


def _groups(spool: Spool) -> Iterator[tuple[list[dict], int, int, int]]:
    """(records, offset after them, line count, unreadable lines) in spool order: consecutive metrics
    records of one run together (one log_batch), every other record alone."""
    group: list[dict] = []
    key = None
    end = lines = size = 0
    for offset, count, record in spool.records():
        k = _group_key(record)
        if group and (k is None or k != key or size + len(record.get("metrics") or {}) > MAX_METRICS_PER_BATCH):
            yield group, end, lines, 0
            group, size = [], 0
        if record is None:
            yield [], offset, count, 1
            continue
        end, lines, key = offset, count, k
        group.append(record)
        size += len(record.get("metrics") or {})
        if k is None:
            yield group, end, lines, 0
            group, size = [], 0
    if group:
        yield group, end, lines, 0


def drain(spool: Spool, store: Store, *, retry_s: float, budget_s: float | None = None,
          warn: Callable[[str], None] = _warn) -> tuple[int, int, Exception | None]:
    """Deliver the spool's pending records in order, recording progress after each batch. Returns
    (records delivered, items rejected, the failure that stopped it: None when the spool is empty or the
    `budget_s` is spent). An emptied spool is removed."""
    start = time.monotonic()
    delivered = rejected = 0
    for records, offset, lines, unreadable in _groups(spool):
        problems = []
        if records:
            ok, problems, error = store.deliver_resilient(records, retry_s)
            if not ok:
                return delivered, rejected, error
        if unreadable:
            problems.append(f"an unreadable line ({lines}) of {spool.path}")
        spool.commit(offset, lines)
        delivered += len(records)
        rejected += len(problems)
        for problem in problems:
            warn(f"warning: MLflow rejected {problem}; skipped")
        if budget_s is not None and time.monotonic() - start > budget_s:
            return delivered, rejected, None
    spool.finish()
    return delivered, rejected, None


def _client(tracking_uri: str):
    # Fail in seconds, not minutes of urllib3 retries, when the server is gone: our own retries are bounded.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):  # sqlite creates the file, not its folder
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------ mlflow-replay
def _recorded_uri(spool: Spool) -> str | None:
    """The URI noted in the spool's records (delivered ones included: the file keeps them until it is
    empty), the latest one."""
    uri = None
    with open(spool.path, "rb") as f:
        for raw in f:
            if b'"uri"' in raw:
                with contextlib.suppress(ValueError, AttributeError):
                    uri = json.loads(raw).get("uri") or uri
    return uri


def _replay_uri(spool: Spool, output_dir: Path, given: str | None) -> str:
    """--tracking-uri, else where the run was logging (unless its password was redacted), else
    $MLFLOW_TRACKING_URI, else the default store OUTPUT_DIR/mlflow.db."""
    if given:
        return given
    recorded = _recorded_uri(spool)
    if recorded and recorded.startswith("sqlite:///") and not Path(recorded[len("sqlite:///"):]).exists():
        recorded = None  # the output folder moved: its own store is the default below
    if recorded and REDACTED not in recorded:
        return recorded
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if recorded:
        raise ValueError(f"{spool.path} was logging to {recorded} (password redacted): pass --tracking-uri "
                         "or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def replay_spools(output_dir: str | os.PathLike, tracking_uri: str | None = None, *, retry_s: float = 10.0,
                  say: Callable[[str], None] = print) -> int:
    """Deliver every spool under `output_dir` (its own first: a two-stage run's parent, then each stage's).
    Returns 0 when nothing is left, 1 otherwise."""
    out = Path(output_dir)
    spools = [Spool(p) for p in [out / SPOOL_NAME, *sorted(out.glob(f"*/{SPOOL_NAME}"))] if p.is_file()]
    if not spools:
        say(f"no MLflow spool in {out}: nothing to replay")
        return 0
    status = 0
    stores: dict[str, Store] = {}
    for spool in spools:
        try:
            uri = _replay_uri(spool, out, tracking_uri)
        except ValueError as e:
            say(f"error: {e}")
            status = 1
            continue
        if not spool.lock():
            say(f"{spool.path}: skipped, a running process is logging to it (it replays it itself)")
            status = 1
            continue
        try:
            waiting = [r for _, _, r in spool.records() if r]
            pending = spool.pending()
            if uri not in stores:
                artifacts = None
                if uri.startswith("sqlite:///"):
                    artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
                stores[uri] = Store(_client(uri), artifacts)
            store = stores[uri]
            delivered, rejected, error = drain(spool, store, retry_s=retry_s)
        finally:
            spool.unlock()
        runs = sorted({r.get("run_id") or store.runs.get(r["local_id"]) or "(not created)" for r in waiting})
        line = (f"{spool.path}: {delivered} of {pending} records replayed to MLflow at {redact_text(uri)}"
                + (f" (run {', '.join(runs)})" if runs else "")
                + (f"; {rejected} rejected (warnings above)" if rejected else ""))
        if error is not None:
            status = 1
            line += (f"; stopped, MLflow is unreachable ({_brief(error)}): {spool.pending()} records left, "
                     "run the command again when it answers")
        say(line)
    return status


def replay_main(argv: list[str], prog: str = "qwen_finetune.py") -> int:
    p = argparse.ArgumentParser(
        prog=f"{prog} mlflow-replay",
        description="Deliver the MLflow records a run spooled while the tracking server was unreachable "
                    "(OUTPUT_DIR/mlflow_spool.jsonl and OUTPUT_DIR/*/mlflow_spool.jsonl) into the same runs, "
                    "in order; a run created while the server was down is created now, with its original "
                    "start time. Delivered records are removed from the spool: running it again sends nothing twice.")
    p.add_argument("output_dir", help="the run's output_dir (or one stage's folder)")
    p.add_argument("--tracking-uri", help="default: the URI the run logged to (recorded in the spool, unless it "
                   "held a password), else $MLFLOW_TRACKING_URI, else sqlite OUTPUT_DIR/mlflow.db")
    args = p.parse_args(argv)
    if not Path(args.output_dir).is_dir():
        print(f"error: {args.output_dir} is not a folder", file=sys.stderr)
        return 1
    return replay_spools(args.output_dir, args.tracking_uri)
