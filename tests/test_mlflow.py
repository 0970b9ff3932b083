"""MLflow logging against a real `mlflow server` on 127.0.0.1 (sqlite backend, free port), against the
default sqlite store in output_dir, and the redaction of secrets from what is logged."""

import json

import pytest
from conftest import free_port

from callbacks.redact import REDACTED, is_secret_name, redact, redact_text
from test_trainer import SMALL, ok, summary, train

SECRET_TOKEN = "hf_" + "Zq8" * 12
SECRET_PASSWORD = "pw-Secr3t-9931"


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
    assert params["config.stage2_learning_rate"] == "0.001" and params["backend"] == "hf"
    assert len(params["data.train_sha256"]) == 64 and params["data.train_examples"] == "48"
    assert params["libraries.trl"] and params["lora.default.r"] == "16"
    assert "mlflow.experts" not in params  # only what we log
    history = client.get_metric_history(stage2.info.run_id, "loss")
    assert [m.step for m in history][:3] == [1, 2, 3]
    for name in ("eval_loss", "gen_json_parse_rate", "gen_offender_name_set_f1", "gen_truncation_rate"):
        assert client.get_metric_history(stage2.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(stage2.info.run_id)}
    assert {"config.yaml", "run_summary.json", "generation_eval"} <= artifacts
    gen_files = {a.path for a in client.list_artifacts(stage2.info.run_id, "generation_eval")}
    assert any(p.endswith(".json") for p in gen_files) and any(p.endswith(".jsonl") for p in gen_files)

    # no secret anywhere: params of every run, and every artifact's text
    logged = json.dumps([r.data.params for r in runs])
    local = tmp_path / "downloaded"
    for run in runs:
        client.download_artifacts(run.info.run_id, "", str(local / run.info.run_id))
    logged += "".join(p.read_text(errors="ignore") for p in local.rglob("*") if p.is_file())
    assert SECRET_TOKEN not in logged and SECRET_PASSWORD not in logged
    assert "alice:***@" in logged  # the tracking URI is logged, with its password redacted


def test_server_dying_mid_run_spools_and_training_finishes(tmp_path, mlflow_server):
    uri, proc = mlflow_server
    result = ok(train("--mode", "single", "--backend", "hf", "output_dir=out", "mlflow=true",
                      f"mlflow_tracking_uri={uri}", "extra_callbacks=trainer_hooks.KillProcessAt",
                      "eval_steps=2", *SMALL, cwd=tmp_path,
                      env={"KILL_PGID": str(proc.pid), "KILL_AT_STEP": "1"}))
    assert "is unreachable" in result.stderr and "mlflow_spool.jsonl" in result.stderr
    assert summary(tmp_path / "out")["global_step"] == 3
    spooled = [json.loads(line) for line in (tmp_path / "out" / "single" / "mlflow_spool.jsonl").open()]
    kinds = {e["kind"] for e in spooled}
    assert "metrics" in kinds and "artifact" in kinds and "end" in kinds
    assert any("gen_json_parse_rate" in e.get("metrics", {}) for e in spooled)
    assert max(e["step"] for e in spooled if e["kind"] == "metrics") == 3


def test_require_fails_fast_when_the_server_is_unreachable(tmp_path):
    result = train("--mode", "single", "--backend", "hf", "output_dir=out", "mlflow=true", "mlflow_require=true",
                   f"mlflow_tracking_uri=http://127.0.0.1:{free_port()}", *SMALL, cwd=tmp_path)
    assert result.returncode != 0 and "require=True" in result.stderr


def test_two_stage_default_store_is_one_sqlite_file_in_output_dir_with_nested_stage_runs(tmp_path, monkeypatch):
    """No tracking URI anywhere: the parent and both stages share output_dir/mlflow.db (so the stages
    nest under the parent); the spool and other per-stage files would stay in the stage folders."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ok(train("--mode", "two-stage", "--backend", "hf", "output_dir=out", "mlflow=true", *SMALL,
             "max_steps=2", "gen_eval_max_samples=2", cwd=tmp_path))
    out = tmp_path / "out"
    assert (out / "mlflow.db").is_file()
    assert not list(out.glob("*/mlflow.db")) and not list(out.glob("*/mlartifacts"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qwen-finetune")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and parents[0].info.run_name == "out" and sorted(children) == ["stage1", "stage2"]
    for name, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.run_id == summary(out, name)["mlflow_run_id"] and run.info.status == "FINISHED"
        assert client.get_metric_history(run.info.run_id, "loss")
    assert parents[0].info.status == "FINISHED"
    assert not list(out.glob("*/mlflow_spool.jsonl"))  # every call reached the store: nothing went offline
    # a param name MLflow rejects (the records without a source count as "(none)") is made valid
    assert children["stage1"].data.params["data.sources._none_"] == "48"
    params = children["stage2"].data.params
    # a data key that only looks like a secret word is logged (it was "***" before)
    assert params["data.token_lengths.max_length"] == "640" and params["config.lora_r"] == "16"
    assert REDACTED not in json.dumps([r.data.params for r in runs])  # nothing secret in a plain run


# ------------------------------------------------------------------ redaction (callbacks/redact.py)
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
    from finetune.config import FinetuneConfig, field_names, to_dict

    assert [n for n in field_names() if is_secret_name(n)] == []
    assert REDACTED not in json.dumps(to_dict(FinetuneConfig()))
