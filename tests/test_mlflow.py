"""MLflow logging against a real `mlflow server` on 127.0.0.1 (sqlite backend, free port), against the
default sqlite store in output_dir, and the redaction of secrets from what is logged."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import MLFLOW, REPO, free_port, run_cli

from core.redact import REDACTED, is_secret_name, redact, redact_text
from test_trainer import SMALL, ok, summary, train

SECRET_TOKEN = "hf_" + "Zq8" * 12
SECRET_PASSWORD = "pw-Secr3t-9931"
SPOOL_NAME = "mlflow_spool.jsonl"


def test_two_stage_run_logs_nested_runs_params_metrics_artifacts_without_secrets(tmp_path, mlflow_server):
    uri, _ = mlflow_server
    host = uri.split("//")[1]
    env = {"HF_TOKEN": SECRET_TOKEN, "MLFLOW_TRACKING_PASSWORD": SECRET_PASSWORD, "WANDB_API_KEY": SECRET_TOKEN}
    ok(train("--mode", "two-stage", "--backend", "hf", "output_dir=out", "mlflow=true",
             f"mlflow_tracking_uri=http://alice:{SECRET_PASSWORD}@{host}", "mlflow_experiment=tiny-test",
             "eval_steps=2", *SMALL, cwd=tmp_path, env=env))

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and sorted(r.info.run_name for r in children) == ["stage1", "stage2"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    stage2 = next(r for r in children if r.info.run_name == "stage2")
    assert stage2.info.run_id == summary(tmp_path / "out", "stage2")["mlflow_run_id"]
    params = stage2.data.params
    assert params["config.stage2_learning_rate"] == "0.002" and params["backend"] == "hf"
    assert len(params["data.train_sha256"]) == 64 and params["data.train_examples"] == "48"
    assert params["libraries.trl"] and params["lora.default.r"] == "16"
    assert "mlflow.experts" not in params  # only what we log
    history = client.get_metric_history(stage2.info.run_id, "loss")
    assert [m.step for m in history][:3] == [1, 2, 3]
    for name in ("eval_loss", "gen_json_parse_rate", "gen_offender_name_set_f1", "gen_truncation_rate"):
        assert client.get_metric_history(stage2.info.run_id, name), name
    best = summary(tmp_path / "out", "stage2")["best"]  # the step adapter/ holds, and its value
    assert stage2.data.metrics["best_step"] == best["step"]
    assert stage2.data.metrics["best_gen_offender_name_set_f1"] == pytest.approx(best["value"])
    artifacts = {a.path for a in client.list_artifacts(stage2.info.run_id)}
    assert {"config.yaml", "run_summary.json", "generation_eval"} <= artifacts
    gen_files = {a.path for a in client.list_artifacts(stage2.info.run_id, "generation_eval")}
    assert all(any(p.endswith(ext) for p in gen_files) for ext in (".json", ".jsonl", ".md")), gen_files

    # no secret anywhere: params of every run, and every artifact's text
    logged = json.dumps([r.data.params for r in runs])
    local = tmp_path / "downloaded"
    for run in runs:
        client.download_artifacts(run.info.run_id, "", str(local / run.info.run_id))
    logged += "".join(p.read_text(errors="ignore") for p in local.rglob("*") if p.is_file())
    assert SECRET_TOKEN not in logged and SECRET_PASSWORD not in logged
    assert "alice:***@" in logged  # the tracking URI is logged, with its password redacted


def start_server(port: int, store: Path) -> subprocess.Popen:
    """`mlflow server` as the mlflow_server fixture starts it, on a given port and store (a restart)."""
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not healthy(f"http://127.0.0.1:{port}"):
        if time.time() > deadline or proc.poll() is not None:
            stop_server(proc)
            pytest.fail("mlflow server did not (re)start within 120 s")
        time.sleep(0.3)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def __getattr__(name):
    """HoldUntilServerBack, a trainer callback the training process loads from here through extra_callbacks
    (built on first use: collecting these tests does not import transformers). Once the logger has gone
    offline (its spool exists), a step's end waits until SERVER_URI answers again, so the steps after it
    log to the restarted server."""
    if name != "HoldUntilServerBack":
        raise AttributeError(name)
    from transformers import TrainerCallback

    class HoldUntilServerBack(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if (Path(args.output_dir) / SPOOL_NAME).exists():
                deadline = time.time() + 180
                while not healthy(os.environ["SERVER_URI"]) and time.time() < deadline:
                    time.sleep(0.2)

    return HoldUntilServerBack


def test_server_restarted_mid_run_gets_every_metric_once_in_the_same_run(tmp_path, mlflow_server):
    """The server dies after step 1 and comes back (same port, same store) while the run goes on: what the
    logger spooled meanwhile is replayed into the same run, in order, and nothing is logged twice."""
    uri, proc = mlflow_server
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "KILL_PGID": str(proc.pid),
           "KILL_AT_STEP": "1", "SERVER_URI": uri, "MLFLOW_LOGGER_RECONNECT_S": "0", "MLFLOW_LOGGER_RETRY_S": "0.5"}
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
        training = subprocess.Popen(
            [sys.executable, str(REPO / "qwen_finetune.py"), "--mode", "single", "--backend", "hf", "output_dir=out",
             "mlflow=true", f"mlflow_tracking_uri={uri}", "gen_eval=false",
             "extra_callbacks=trainer_hooks.KillProcessAt,test_mlflow.HoldUntilServerBack", *SMALL,
             "max_steps=2", "eval_max_samples=4"],
            cwd=tmp_path, env=env, stdout=out_file, stderr=err_file)
    server = None
    try:
        spool = out / "single" / SPOOL_NAME
        deadline = time.time() + 600
        while proc.poll() is None or not spool.exists():  # killed, and the logger went offline
            assert training.poll() is None and time.time() < deadline, stderr.read_text()[-5000:]
            time.sleep(0.2)
        server = start_server(int(uri.rsplit(":", 1)[1]), tmp_path / "server")
        training.wait(timeout=600)
        result = ok(subprocess.CompletedProcess(training.args, training.returncode, stdout.read_text(),
                                                stderr.read_text()))
        assert "is unreachable" in result.stderr and "answers again" in result.stderr
        s = summary(out)
        assert s["global_step"] == 2
        counts = s["mlflow_spool"]
        assert counts["spooled"] >= 1 and counts["replayed"] == counts["spooled"], counts
        assert counts["pending"] == 0 and counts["rejected"] == 0, counts
        assert "records spooled while the server was unreachable" in result.stdout
        assert not spool.exists() and not list(spool.parent.glob(SPOOL_NAME + ".*"))

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(s["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.params["backend"] == "hf"
        runs = client.search_runs([run.info.experiment_id])
        assert [r.info.run_id for r in runs] == [run.info.run_id]  # the same run, not a second one
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == \
            [tuple(x) for x in s["train_losses"]]
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (key, steps)
        assert "eval_loss" in run.data.metrics
        assert {"config.yaml", "run_summary.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        if training.poll() is None:
            training.kill()
            training.wait()
        if server is not None:
            stop_server(server)


def test_a_run_that_ended_while_the_server_was_down_is_completed_by_mlflow_replay(tmp_path, monkeypatch, capsys):
    """The server is down from the start to the end of a two-stage-shaped run (a parent and a stage, neither
    run created): `mlflow-replay` creates both (nested, original start times) and delivers everything; a
    second replay, and a replay of the same records again (progress lost), add nothing."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the logger's defaults, undone after the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow import MlflowClient

    from callbacks.mlflow_logger import MLflowLogger
    from finetune.cli import main

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "out"
    kwargs = {"tracking_uri": uri, "experiment": "replay-test", "retry_s": 0, "reconnect_s": 3600}
    parent = MLflowLogger(out, run_name="out", **kwargs)
    parent.start({"config": {"lr": 0.001, "hf_token": SECRET_TOKEN}})
    stage = MLflowLogger(out / "stage1", run_name="stage1", parent=parent, params={"stage": "stage1"}, **kwargs)
    stage.start()
    losses = [(1, 2.5), (2, 2.25), (3, 2.0)]
    for step, loss in losses:
        stage.log_metrics({"loss": loss, "learning_rate": 0.001}, step)
    stage.log_metrics({"loss": 2.0}, 3)  # the same value for the same step again: not logged twice
    summary_file = out / "stage1" / "run_summary.json"
    summary_file.write_text('{"global_step": 3}')
    stage.end(files=(summary_file,))
    parent.end()
    err = capsys.readouterr().err
    assert "is unreachable" in err and f"mlflow-replay {out}" in err
    assert stage.run_id is None and stage.spool_counts() == {"spooled": 7, "replayed": 0, "pending": 7,
                                                             "rejected": 0}
    spools = [out / SPOOL_NAME, out / "stage1" / SPOOL_NAME]
    texts = [p.read_text() for p in spools]
    assert SECRET_TOKEN not in "".join(texts)
    records = [json.loads(line) for line in texts[1].splitlines()]
    assert [r["kind"] for r in records] == ["start", "params", "metrics", "metrics", "metrics", "artifact", "end"]
    spooled_metrics = [(r["step"], r["metrics"]["loss"], r["timestamp"]) for r in records if r["kind"] == "metrics"]

    server = start_server(port, tmp_path / "server")
    try:
        result = run_cli("qwen_finetune.py", "mlflow-replay", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "3 of 3 records replayed" in result.stdout and "7 of 7 records replayed" in result.stdout
        assert not any(p.exists() for p in spools) and not list(out.rglob(SPOOL_NAME + ".*"))

        client = MlflowClient(tracking_uri=uri)

        def snapshot():
            exp = client.get_experiment_by_name("replay-test")
            runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
            return runs, {name: [(m.step, m.value, m.timestamp) for key in ("loss", "learning_rate")
                                 for m in client.get_metric_history(r.info.run_id, key)]
                          for name, r in runs.items()}

        runs, history = snapshot()
        assert sorted(runs) == ["out", "stage1"]
        child, top = runs["stage1"], runs["out"]
        assert child.data.tags["mlflow.parentRunId"] == top.info.run_id
        assert child.info.status == top.info.status == "FINISHED"
        assert child.info.start_time == records[0]["start_time"] and child.info.end_time == records[-1]["end_time"]
        assert [(m.step, m.value, m.timestamp) for m in client.get_metric_history(child.info.run_id, "loss")] == \
            spooled_metrics
        assert child.data.params["stage"] == "stage1" and top.data.params["config.hf_token"] == REDACTED
        assert "run_summary.json" in {a.path for a in client.list_artifacts(child.info.run_id)}

        # again: nothing left to replay
        assert main(["mlflow-replay", str(out), "--tracking-uri", uri], "qwen_finetune.py", "") == 0
        assert "nothing to replay" in capsys.readouterr().out
        # the same records once more, as if the replay had stopped before noting its progress
        for path, text in zip(spools, texts):
            path.write_text(text)
        assert main(["mlflow-replay", str(out)], "qwen_finetune.py", "") == 0
        again_runs, again_history = snapshot()
        assert sorted(again_runs) == ["out", "stage1"] and again_history == history
        assert again_runs["stage1"].data.params == child.data.params

        # online: a value the server refuses is named once and skipped; the logger stays online
        live = MLflowLogger(tmp_path / "live", **kwargs)
        live.start({"lr": 1})
        capsys.readouterr()
        live.log_params({"lr": 2})
        live.log_metrics({"loss": 1.5}, 1)
        err = capsys.readouterr().err
        assert "rejected param 'lr'" in err and "INVALID_PARAMETER_VALUE" in err and err.count("rejected") == 1
        assert not live.offline and not live.spool.path.exists()
        assert [m.value for m in client.get_metric_history(live.run_id, "loss")] == [1.5]
    finally:
        stop_server(server)


class FakeStore:
    """An in-memory tracking store for the logger's client, failing on demand: `down` (every call is refused,
    as by a stopped server), `fail_calls` (these log_batch calls, counted from 1, fail like a server that
    drops the connection). It keeps every metric row it gets: a record delivered twice shows."""

    def __init__(self):
        self.down, self.fail_calls, self.calls = False, set(), 0
        self.run_tags, self.params, self.metrics, self.artifacts, self.ended = {}, {}, [], [], {}

    def _answer(self):
        if self.down:
            raise ConnectionError("Connection refused")

    def search_experiments(self, max_results=1):
        self._answer()
        return []

    def get_experiment_by_name(self, name):
        self._answer()
        return SimpleNamespace(experiment_id="1")

    def search_runs(self, experiment_ids, filter_string, max_results=1):
        self._answer()
        local_id = filter_string.split("'")[1]
        return [SimpleNamespace(info=SimpleNamespace(run_id=r)) for r, tags in self.run_tags.items()
                if tags.get("qwen_finetune.local_id") == local_id]

    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        self._answer()
        run_id = f"run{len(self.run_tags)}"
        self.run_tags[run_id] = dict(tags or {}, start_time=start_time)
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        from mlflow.exceptions import MlflowException

        self._answer()
        self.calls += 1
        if self.calls in self.fail_calls:
            raise ConnectionError("Connection reset by peer")
        for p in params:
            if self.params.get((run_id, p.key), p.value) != p.value:
                raise MlflowException.invalid_parameter_value(f"Changing param values is not allowed: {p.key}")
        self.params.update({(run_id, p.key): p.value for p in params})
        self.metrics += [(run_id, m.key, m.step, m.value) for m in metrics]

    def log_artifact(self, run_id, path, artifact_path=None):
        self._answer()
        self.artifacts.append((run_id, Path(path).name))

    def set_terminated(self, run_id, status, end_time=None):
        self._answer()
        self.ended[run_id] = status


def fake_logger(tmp_path, fake, **kwargs):
    from callbacks.mlflow_logger import MLflowLogger

    logger = MLflowLogger(tmp_path / "run", tracking_uri="http://fake:5000", **{"retry_s": 1, "reconnect_s": 0,
                                                                                **kwargs})
    logger._client = fake
    return logger


def test_transient_failures_are_retried_and_refused_values_are_named_and_skipped(tmp_path, capsys):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    from callbacks.mlflow_spool import Rejected, is_transient

    assert is_transient(ConnectionError()) and is_transient(TimeoutError())
    assert is_transient(MlflowException("API request to http://h failed with exception Connection refused"))
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(MlflowException("bad", error_code=BAD_REQUEST))
    assert not is_transient(Rejected("gone")) and not is_transient(TypeError("a bug"))

    fake = FakeStore()
    logger = fake_logger(tmp_path, fake)
    logger.start({"lr": 0.1, "lora_r": 8})
    fake.fail_calls = {fake.calls + 1, fake.calls + 2}  # two dropped connections, then it answers
    logger.log_metrics({"loss": 2.0}, 1)
    assert fake.metrics == [("run0", "loss", 1, 2.0)] and not logger.offline
    capsys.readouterr()
    logger.log_params({"lr": 0.2, "seed": 7})  # one refused value in the batch: the other one still arrives
    logger.log_metrics({"loss": 1.5}, 2)
    err = capsys.readouterr().err
    assert err.count("rejected") == 1 and "param 'lr'" in err and "INVALID_PARAMETER_VALUE" in err
    assert fake.params[("run0", "seed")] == "7" and fake.params[("run0", "lr")] == "0.1"
    assert fake.metrics[-1] == ("run0", "loss", 2, 1.5) and not logger.offline
    assert not logger.spool.path.exists() and logger.spool_counts()["rejected"] == 1


def test_an_outage_is_spooled_then_replayed_in_order_into_the_same_run(tmp_path, capsys):
    fake = FakeStore()
    logger = fake_logger(tmp_path, fake, retry_s=0)
    logger.start({"lr": 0.1})
    logger.log_metrics({"loss": 4.0}, 1)
    fake.down = True
    logger.log_metrics({"loss": 3.0}, 2)
    logger.log_metrics({"loss": 2.0}, 3)
    assert logger.offline and logger.spool.pending() == 2
    assert "is unreachable" in capsys.readouterr().err
    fake.down = False
    logger.log_metrics({"loss": 1.0}, 4)  # probes, replays steps 2 and 3, then logs step 4
    assert fake.metrics == [("run0", "loss", s, 5.0 - s) for s in (1, 2, 3, 4)]
    assert "answers again" in capsys.readouterr().err and not logger.offline
    assert not logger.spool.path.exists()
    logger.end()
    assert fake.ended == {"run0": "FINISHED"}
    assert logger.spool_counts() == {"spooled": 2, "replayed": 2, "pending": 0, "rejected": 0}


def test_a_replay_cut_short_resumes_where_it_stopped_and_creates_the_run_once(tmp_path):
    """Server down from the start: nothing but the spool. A replay stops midway (the server goes again);
    another one, with a fresh store (a new process), finds the run it created and sends the rest."""
    from callbacks.mlflow_spool import Spool, Store, drain

    fake = FakeStore()
    fake.down = True
    logger = fake_logger(tmp_path, fake, retry_s=0)
    logger.start({"lr": 0.1})
    for step in (1, 2):
        logger.log_metrics({"loss": float(step)}, step)
    (tmp_path / "run" / "gen.json").write_text("{}")
    logger.log_artifact(tmp_path / "run" / "gen.json")
    logger.log_metrics({"loss": 3.0}, 3)
    logger.end()
    assert logger.run_id is None and logger.spool.pending() == 7 and fake.run_tags == {}

    fake.down = False
    original = fake.log_artifact

    def drop(*args, **kwargs):  # the server goes away at the artifact
        fake.down = True
        raise ConnectionError("Connection reset by peer")

    fake.log_artifact = drop
    spool = Spool(logger.spool.path)
    delivered, rejected, error = drain(spool, Store(fake), retry_s=0)
    assert (delivered, rejected) == (4, 0) and isinstance(error, ConnectionError)
    assert spool.pending() == 3 and fake.metrics == [("run0", "loss", 1, 1.0), ("run0", "loss", 2, 2.0)]

    fake.down, fake.log_artifact = False, original
    delivered, rejected, error = drain(spool, Store(fake), retry_s=0)
    assert (delivered, rejected, error) == (3, 0, None)
    assert list(fake.run_tags) == ["run0"] and fake.run_tags["run0"]["start_time"] <= time.time() * 1000
    assert fake.metrics == [("run0", "loss", s, float(s)) for s in (1, 2, 3)]
    assert fake.artifacts == [("run0", "gen.json")] and fake.ended == {"run0": "FINISHED"}
    assert not spool.path.exists() and not spool.offset_path.exists()


def test_require_fails_fast_when_the_server_is_unreachable(tmp_path):
    result = train("--mode", "single", "--backend", "hf", "output_dir=out", "mlflow=true", "mlflow_require=true",
                   f"mlflow_tracking_uri=http://127.0.0.1:{free_port()}", *SMALL, cwd=tmp_path)
    assert result.returncode != 0 and "require=True" in result.stderr


# ------------------------------------------------------------------ redaction (core/redact.py)
@pytest.mark.parametrize("name", [
    "encryption_key", "db_key", "API_KEY", "api_key", "apiKey", "apikey", "x-api-key", "WANDB_API_KEY",
    "aws_secret_access_key", "key", "hf_token", "HF_TOKEN", "hub_token", "access_token", "hfToken", "token",
    "password", "MLFLOW_TRACKING_PASSWORD", "db.passwd", "secret", "client_secret", "secrets",
    "credential", "credentials", "aws_credentials", "use_auth_token",
])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    # the secret word is not the last word, or is part of another word
    "keyword", "monkey", "keys", "ignore_keys", "tokenizer", "tokenizer_name", "token_lengths", "pad_token_id",
    "api_key_file", "hf_token_path", "password_file", "secret_name", "hub_private_repo",
    # plural tokens are counts, not credentials
    "max_tokens", "max_new_tokens", "num_tokens", "gen_eval_max_new_tokens",
    # a tokenizer's special tokens are text such as "<|im_end|>"
    "pad_token", "eos_token", "bos_token", "unk_token",
    "", "lr", "lora_r",
])
def test_not_secret_names(name):
    assert not is_secret_name(name)


def test_redact_nested_dicts_and_lists_at_any_depth():
    config = {
        "encryption_key": "abc123", "lora_r": 16, "keyword": "hawks", "monkey": "george", "max_tokens": 512,
        "db": {"host": "db.local", "db_key": "k-999", "PASSWORD": 1234, "passwd": ""},
        "services": [{"name": "hub", "hf_token": "plain-token-value", "API_KEY": "xyz"},
                     {"credentials": {"user": "bob", "pw": "nested"}, "hf_use_auth_token": True}],
        "special_tokens": {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
        "token_lengths": {"tokens": {"p50": 100}, "max_length": 640}, "hub_token": None,
        "tracking": "https://alice:s3cr3t@host:5000/path?token=q-tok&experiment=1",
    }
    out = redact(config)
    assert out == {
        "encryption_key": REDACTED, "lora_r": 16, "keyword": "hawks", "monkey": "george", "max_tokens": 512,
        "db": {"host": "db.local", "db_key": REDACTED, "PASSWORD": REDACTED, "passwd": ""},
        "services": [{"name": "hub", "hf_token": REDACTED, "API_KEY": REDACTED},
                     {"credentials": REDACTED, "hf_use_auth_token": True}],
        "special_tokens": {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
        "token_lengths": {"tokens": {"p50": 100}, "max_length": 640}, "hub_token": None,
        "tracking": f"https://alice:{REDACTED}@host:5000/path?token={REDACTED}&experiment=1",
    }
    assert config["db"]["db_key"] == "k-999"  # a copy: the input is untouched


def test_redact_text_finds_secrets_by_value():
    text = (f"uri postgresql://u:{SECRET_PASSWORD}@db/x, token {SECRET_TOKEN}, "
            f"Server=db;AccountKey=abcDEF==;Database=x, https://h/p?api_key=k1&page=2")
    out = redact_text(text)
    assert SECRET_PASSWORD not in out and SECRET_TOKEN not in out and "abcDEF" not in out and "k1" not in out
    assert "postgresql://u:***@db/x" in out and "Database=x" in out and "page=2" in out


def test_a_plain_run_config_has_no_secret_names():
    """Our own config keys are never redacted: a normal run's logged params lose nothing."""
    from finetune.config import to_dict
    from finetune.config_schema import FinetuneConfig, field_names

    assert [n for n in field_names() if is_secret_name(n)] == []
    assert REDACTED not in json.dumps(to_dict(FinetuneConfig()))
