"""MLflow logging against a real `mlflow server` on 127.0.0.1 (sqlite backend, free port)."""

import json

from conftest import free_port
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
