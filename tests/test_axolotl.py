"""The Axolotl path: the config check against the user's Axolotl plan, and a real Axolotl
run (its own environment, CPU) with both shared plugins."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO, run_cli

SEED_PLAN = REPO / "tests" / "fixtures" / "seed_plan_axolotl.yml"
CONFIGS = REPO / "axolotl_configs"


def check(config, *args, cwd=REPO):
    return run_cli(str(REPO / "parity.py"), "check-axolotl", str(config), *args, cwd=cwd)


def problem_lines(result, level="error"):
    return [line for line in result.stdout.splitlines() if line.startswith(level + ":")]


def test_check_reports_every_problem_of_the_seed_plan(tmp_path, axolotl_ready):
    # The first Axolotl attempt's ZeRO file: a fixed lr, and the train_batch_size 64 that raised
    # "train_batch_size=64 vs HF calculated=16" on one GPU.
    shutil.copy(SEED_PLAN, tmp_path / "plan.yml")
    shutil.copy(REPO / "tests" / "fixtures" / "seed_zero2.json", tmp_path)
    elsewhere = tmp_path / "elsewhere"  # checked from another folder: the ZeRO file beside the config is found
    elsewhere.mkdir()
    result = check(tmp_path / "plan.yml", "--num-gpus", "1", cwd=elsewhere)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = "\n".join(problem_lines(result))
    assert "file not found" not in errors
    assert "datasets_eval: unknown to Axolotl" in errors and "use test_datasets" in errors
    assert "chat_template: 'qwen3_instruct' is not a valid Axolotl chat template" in errors
    assert "datasets[0].type: unknown dataset type 'custom_instruction'" in errors
    for plugin in ("callbacks.generation_eval:GenerationEvalCallback", "callbacks.mlflow_logger:MLflowLoggerCallback"):
        assert f"plugins: '{plugin}' does not load" in errors
    assert "callbacks.axolotl_plugins.GenerationEvalPlugin" in errors
    # With Axolotl 0.19's PEFT the module names are renamed onto the experts, so the
    # problem is the implicit dependence on that rename (see the experts test below).
    assert "lora_target_modules: no lora_target_parameters" in errors
    assert "train_batch_size is 64" in errors and "gives 16" in errors
    assert "optimizer.params.lr is fixed at 0.0002" in errors
    assert "datasets[0].field_instruction: not a dataset key" in errors
    assert "trust_remote_code" in result.stdout  # a warning, not an error
    assert any("model_config: the MoE router load-balancing loss is left to the checkpoint" in line
               for line in problem_lines(result, "warning"))
    # One line per problem, and a count at the end.
    assert result.stdout.strip().splitlines()[-1].endswith(
        f"{len(problem_lines(result))} error(s), {len(problem_lines(result, 'warning'))} warning(s)")


def test_check_finds_attention_only_targets_on_the_30b_moe(tmp_path, axolotl_ready):
    plan = (CONFIGS / "qwen_finetune.yml").read_text(encoding="utf-8")
    attention_only = plan.replace("lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]\n", "")
    assert attention_only != plan
    (tmp_path / "attention_only.yml").write_text(attention_only, encoding="utf-8")
    result = check(tmp_path / "attention_only.yml")
    assert result.returncode == 1
    assert any("reach no fused expert" in line and "lora_target_parameters" in line
               for line in problem_lines(result)), result.stdout


# The shipped configs pass the check with no base_model/model_config warning: tests/test_readme_commands.py
# runs docs/axolotl.md's check-axolotl command on each of them.


def test_check_reports_a_plugin_that_rejects_the_config(tmp_path, axolotl_ready):
    # The generation-eval plugin has nothing to evaluate: Axolotl would stop at start; the check says so first.
    config = (CONFIGS / "qwen_finetune_test.yml").read_text(encoding="utf-8")
    no_eval = config[:config.index("test_datasets:")] + config[config.index("chat_template:"):]
    (tmp_path / "no_eval.yml").write_text(no_eval, encoding="utf-8")
    result = check(tmp_path / "no_eval.yml")
    assert result.returncode == 1
    assert any("GenerationEvalPlugin' rejects the config" in line and "gen_eval_file" in line
               for line in problem_lines(result)), result.stdout


def test_check_explains_a_missing_file_without_a_traceback(tmp_path):
    result = check(tmp_path / "nope.yml")
    assert result.returncode == 1 and "nope.yml: file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_axolotl_trains_the_tiny_config_with_both_plugins(tmp_path, mlflow_server, axolotl_ready):
    uri, _ = mlflow_server
    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": "pw-never-logged-1234"}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "run_axolotl_train.sh"), "axolotl_configs/tiny_cpu.yml", "1",
         "--max_steps=4", "--eval_steps=2", "--save_steps=4", "--logging_steps=1", "--gen_eval_max_samples=16",
         f"--output_dir={out}", f"--dataset_prepared_path={tmp_path / 'prepared'}",
         f"--mlflow_logger_tracking_uri={uri}", "--mlflow_logger_experiment=axolotl-tiny-test"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    assert "0 error(s)" in result.stdout  # the launcher ran the config check first

    # The generation-eval plugin: files at each evaluation and at the end.
    for step in (2, 4):
        metrics = json.loads((out / f"gen_metrics_step{step}.json").read_text())
        assert metrics["gen_num_examples"] == 16 and 0 <= metrics["gen_json_parse_rate"] <= 1
        assert "gen_offender_presence_f1/positive" in metrics and "gen_truncation_rate" in metrics
        rows = [json.loads(line) for line in (out / f"gen_predictions_step{step}.jsonl").open()]
        assert len(rows) == 16 and {"id", "gold", "prediction", "parseable", "category"} <= rows[0].keys()
        # the messages export keeps shape and non_offenders: the same breakdowns as our trainer's
        assert "gen_non_offender_extracted_rate" in metrics and "gen_error_rate/correct" in metrics
        assert any(k.startswith("gen_offender_name_set_f1/shape/") for k in metrics)
        assert (out / f"gen_errors_step{step}.md").read_text().startswith(f"# Errors at step {step}")

    # run_summary.json in our trainer's format: the shared keys, the losses of every step, and the last
    # generation eval's metrics as its own file has them
    from core import run_summary

    summary = run_summary.read(out / "run_summary.json")
    assert summary["backend"] == "axolotl" and summary["global_step"] == 4 and summary["world_size"] == 1
    assert [step for step, _ in summary["train_losses"]] == [1, 2, 3, 4]
    last = json.loads((out / "gen_metrics_step4.json").read_text())
    assert {k: v for k, v in summary["metrics"].items() if k.startswith("gen_")} == pytest.approx(
        {k: v for k, v in last.items() if k != "step"})
    assert "eval_loss" in summary["metrics"] and "train_runtime" in summary["metrics"]

    # The MLflow plugin: one finished run with params, metrics (gen_* included) and artifacts.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("axolotl-tiny-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["backend"] == "axolotl" and run.data.params["libraries.axolotl"] == "0.19.0"
    assert run.data.params["config.lora_r"] == "16" and run.data.params["lora.default.r"] == "16"
    assert len(run.data.params["data.datasets_0.sha256"]) == 64
    # Axolotl evaluates at step 0 too; the plugin skips generation there (gen_eval_on_start: false).
    assert not (out / "gen_metrics_step0.json").exists()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "gen_json_parse_rate")] == [2, 4]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"axolotl_config.json", "run_summary.json", "generation_eval"} <= artifacts
    assert "pw-never-logged-1234" not in json.dumps(run.data.params)
    # The adapter Axolotl saved is a PEFT adapter the shared evaluator can load.
    assert (out / "adapter_config.json").is_file()
