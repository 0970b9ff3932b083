"""qwen_finetune.py end to end on the tiny models (CPU): modes, backends, outputs,
resume, stage skipping, the stall watchdog and the torchrun path.

Each run is a few optimizer steps on a few dozen examples: enough to prove
the behaviour, seconds to a minute each.
"""

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SMALL = ["max_train_samples=48", "max_steps=3", "eval_max_samples=8", "gen_eval_max_samples=4",
         "gen_eval_batch_size=4", "micro_batch_size=4", "logging_steps=1", "eval_steps=100",
         "save_steps=100"]


def train(*args, cwd: Path, script: str = "qwen_finetune.py", env: dict | None = None,
          launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(REPO / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def summary(out: Path, stage: str = "single") -> dict:
    """The stage's run_summary.json, checked to hold the keys both stacks write."""
    from core import run_summary

    return run_summary.read(out / stage / "run_summary.json")


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def single_hf(tmp_path_factory):
    """One small single-mode run (hf backend, dense), inspected by several tests."""
    cwd = tmp_path_factory.mktemp("single_hf")
    result = ok(train("--mode", "single", "--backend", "hf", "output_dir=out", *SMALL, cwd=cwd))
    return cwd, result


def test_single_mode_writes_adapter_summary_and_marker(single_hf):
    cwd, result = single_hf
    stage = cwd / "out" / "single"
    assert (stage / "COMPLETE").is_file()
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
    assert (stage / "adapter" / "tokenizer_config.json").is_file()
    s = summary(cwd / "out")
    assert s["backend"] == "hf" and s["global_step"] == 3 and len(s["train_losses"]) == 3
    for phase in ("imports", "model_load", "lora", "single.data_load", "single.tokenise", "single.build_trainer",
                  "single.first_optimizer_step"):
        assert s["phase_seconds"][phase] >= 0, phase
    assert s["data"]["train_examples"] == 48 and len(s["data"]["train_sha256"]) == 64
    assert s["libraries"]["trl"] and s["trainable_parameters"]["trainable_by_category"]["attention"] > 0
    assert "eval_loss" in s["metrics"] and "gen_json_parse_rate" in s["metrics"]
    assert list(stage.glob("gen_metrics_step*.json")) and list(stage.glob("gen_predictions_step*.jsonl"))
    assert list(stage.glob("gen_errors_step*.md"))
    # the resolved config is printed at start and saved with the run
    assert "resolved configuration:" in result.stdout and "=== run summary ===" in result.stdout
    assert "max_train_samples: 48" in (stage / "config.yaml").read_text()


def test_rerun_skips_a_complete_run_and_overwrite_retrains(single_hf, tmp_path):
    cwd, _ = single_hf
    before = (cwd / "out" / "single" / "run_summary.json").stat().st_mtime
    again = ok(train("--mode", "single", "--backend", "hf", "output_dir=out", *SMALL, cwd=cwd))
    assert "already complete" in again.stdout
    assert (cwd / "out" / "single" / "run_summary.json").stat().st_mtime == before
    # --overwrite retrains the complete stage (on a copy: the other tests read the first run), here with
    # another learning rate: new losses, the new config recorded, the adapter replaced
    shutil.copytree(cwd / "out", tmp_path / "out")
    old = summary(tmp_path / "out")
    old_adapter = (tmp_path / "out" / "single" / "adapter" / "adapter_model.safetensors").read_bytes()
    redone = ok(train("--mode", "single", "--backend", "hf", "output_dir=out", *SMALL, "learning_rate=1e-3",
                      "--overwrite", cwd=tmp_path))
    assert "already complete" not in redone.stdout and "=== run summary ===" in redone.stdout
    new = summary(tmp_path / "out")
    assert new["train_losses"][0] == pytest.approx(old["train_losses"][0])  # same data and start ...
    assert new["train_losses"][-1] != pytest.approx(old["train_losses"][-1], rel=1e-6)  # ... other steps
    assert "learning_rate: 0.001" in (tmp_path / "out" / "single" / "config.yaml").read_text()
    assert (tmp_path / "out" / "single" / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter


def test_rerun_with_another_config_names_the_changes_instead_of_reusing_the_stage(single_hf):
    """A follow-up command (e.g. the README's group_by_length=true after the first run) must not print the
    old summary as if it had trained; keys that change nothing trained or measured are allowed."""
    cwd, _ = single_hf
    changed = train("--mode", "single", "--backend", "hf", "output_dir=out", *SMALL, "group_by_length=true",
                    "learning_rate=1e-3", cwd=cwd)
    assert changed.returncode == 1 and "Traceback" not in changed.stderr
    assert "is complete but was trained with another configuration" in changed.stderr
    assert "group_by_length: False -> True" in changed.stderr and "learning_rate: 0.004 -> 0.001" in changed.stderr
    assert "--overwrite" in changed.stderr and "output_dir=" in changed.stderr
    assert "=== run summary ===" not in changed.stdout
    same = ok(train("--mode", "single", "--backend", "hf", "output_dir=out", *SMALL, "watchdog_step_s=60",
                    cwd=cwd))
    assert "already complete; nothing to do" in same.stdout


def test_unsloth_that_fails_to_import_falls_back_on_auto_and_stops_when_asked_for(tmp_path):
    """An installed Unsloth that refuses to import (unsupported GPU, broken install): auto says why and
    trains with PEFT; --backend unsloth is one error line."""
    fake = tmp_path / "site" / "unsloth"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise NotImplementedError('Unsloth cannot find any torch accelerator')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO), str(REPO / "tests")])}
    auto = ok(train("--mode", "single", "output_dir=out", *SMALL, "gen_eval=false", cwd=tmp_path, env=env))
    assert ("backend: hf (auto: unsloth is installed but fails to import (NotImplementedError: Unsloth cannot "
            "find any torch accelerator); training with PEFT)") in auto.stdout
    assert summary(tmp_path / "out")["backend"] == "hf"
    asked = train("--mode", "single", "--backend", "unsloth", "output_dir=out2", *SMALL, cwd=tmp_path, env=env)
    assert asked.returncode == 1 and "Traceback" not in asked.stderr
    assert "error: backend 'unsloth' requested but unsloth fails to import (NotImplementedError" in asked.stderr


def test_dropout_on_auto_expert_targets_stops_before_the_model_loads(tmp_path):
    result = train("--mode", "single", "--backend", "hf", "output_dir=out", "model_name=tiny-moe",
                   "lora_dropout=0.1", *SMALL, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "tiny-moe is a MoE whose fused experts get LoRA" in result.stderr and "lora_dropout=0" in result.stderr
    assert "[time] imports" not in result.stdout and "backend:" not in result.stdout
    ok(train("--mode", "single", "--backend", "hf", "output_dir=dense", "model_name=tiny-dense", "lora_dropout=0.1",
             *SMALL, "max_steps=1", "gen_eval=false", cwd=tmp_path))  # a dense model takes dropout


def test_sdpa_varlen_on_a_sliding_window_model_stops_before_the_model_loads(tmp_path):
    from transformers import Qwen3Config

    # a config and no weights: a run that tried to load them would fail with another error
    Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, vocab_size=3000, use_sliding_window=True,
                sliding_window=64).save_pretrained(tmp_path / "windowed")
    result = train("--mode", "single", "--backend", "hf", "output_dir=out", "model_name=windowed", "packing=true",
                   "attn_implementation=sdpa_varlen", *SMALL, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "windowed uses a sliding window of 64; set attn_implementation=sdpa" in result.stderr
    assert "[time] imports" not in result.stdout and "backend:" not in result.stdout


def test_bad_record_stops_the_run_before_the_model_loads(tmp_path):
    from data_tools.synth import generate

    records = json.dumps(generate(0, "train", "positive", 3), ensure_ascii=False, indent=1)
    (tmp_path / "bad.json").write_text(records[:-40] + "\n", encoding="utf-8")  # a truncated last record
    result = train("--mode", "single", "--backend", "hf", "output_dir=out", "train_file=bad.json", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: bad.json:" in result.stderr
    assert "[time] data_check" not in result.stdout and "[time] imports" not in result.stdout
    assert "backend:" not in result.stdout and not (tmp_path / "out" / "single").exists()


def test_another_seed_gives_other_losses(single_hf):
    # The same seed gives the same losses, step by step: tests/test_parity.py's legacy pair (two processes,
    # one configuration) and the resume test (an uninterrupted run against a resumed one) assert it.
    cwd, _ = single_hf
    ok(train("--mode", "single", "--backend", "hf", "output_dir=seed2", "seed=7", *SMALL, cwd=cwd))
    assert summary(cwd / "seed2")["train_losses"] != summary(cwd / "out")["train_losses"]


def _lora_tensors(adapter: Path, needle: str) -> dict:
    return {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if needle in k}


@pytest.mark.parametrize("train_router", [False, True])
def test_moe_experts_carry_trained_lora_and_router_only_when_asked(tmp_path, train_router):
    ok(train("--mode", "single", "--backend", "hf", "model_name=tiny-moe", "output_dir=out",
             f"train_router={str(train_router).lower()}", "gen_eval=false", "learning_rate=1e-2",
             *SMALL, cwd=tmp_path))
    s = summary(tmp_path / "out")
    cats = s["trainable_parameters"]["trainable_by_category"]
    assert cats["experts"] > 0 and cats["attention"] > 0 and cats["dense_mlp"] == 0
    assert s["lora_targets"]["parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    adapter = tmp_path / "out" / "single" / "adapter"
    experts = _lora_tensors(adapter, "experts")
    lora_b = [v for k, v in experts.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: these were trained
    router = {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()
              if ".mlp.gate." in k}
    if not train_router:
        assert cats["router"] == 0 and not router
    else:
        assert cats["router"] > 0 and router
        from transformers import AutoModelForCausalLM

        from tiny import model_dir

        base = AutoModelForCausalLM.from_pretrained(model_dir("tiny-moe"))
        base_router = base.model.layers[0].mlp.gate.weight
        trained = next(v for k, v in router.items() if "layers.0." in k)
        assert trained.shape == base_router.shape and not trained.float().allclose(base_router.float())


def test_dry_run_reports_targets_per_category_without_training(tmp_path):
    result = ok(train("--mode", "single", "model_name=tiny-moe", "--dry-run", "output_dir=out", cwd=tmp_path))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model_class"] == "Qwen3MoeForCausalLM"
    assert report["lora_targets"]["matches"]["mlp.experts.gate_up_proj"] == 2
    assert report["trainable_by_category"]["experts"] > 0 and report["trainable_by_category"]["router"] == 0
    assert report["data"]["single"]["tokens"]["p50"] > 0 and "over_max_length" in report["data"]["single"]
    assert report["memory"]["training_peak_gib"] > 0 and report["memory"]["fits"] is True
    assert not (tmp_path / "out").exists()
    # the expert rank defaults to lora_r and can be set lower (LoRA size is linear in the rank)
    low = ok(train("--mode", "single", "model_name=tiny-moe", "--dry-run", "expert_lora_r=4", cwd=tmp_path))
    low_report = json.loads(low.stdout.strip().splitlines()[-1])
    assert report["lora_targets"]["expert_rank"] == 16 and low_report["lora_targets"]["expert_rank"] == 4
    assert low_report["trainable_by_category"]["experts"] * 4 == report["trainable_by_category"]["experts"]
    assert low_report["trainable_by_category"]["attention"] == report["trainable_by_category"]["attention"]


def test_target_that_matches_nothing_is_an_error(tmp_path):
    result = train("--mode", "single", "model_name=tiny-moe", "--dry-run", "lora_target_modules=q_proj,gate_proj",
                   cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "gate_proj match nothing" in result.stderr and "lora_target_parameters" in result.stderr


def assert_default_mlflow_store(out: Path) -> None:
    """The parent and both stages share output_dir/mlflow.db (so the stages nest under the parent); the
    spool and other per-stage files would stay in the stage folders."""
    from mlflow.tracking import MlflowClient

    from core.redact import REDACTED

    assert (out / "mlflow.db").is_file()
    assert not list(out.glob("*/mlflow.db")) and not list(out.glob("*/mlartifacts"))
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
    # a data key that only looks like a secret word is logged
    assert params["data.token_lengths.max_length"] == "640" and params["config.lora_r"] == "16"
    assert REDACTED not in json.dumps([r.data.params for r in runs])  # nothing secret in a plain run


def test_two_stage_qlora_then_rerun_skips_completed_stages(tmp_path, monkeypatch):
    """On the MoE, 4-bit experts included, with a generation eval mid-stage, logged to MLflow's default
    store (no tracking URI anywhere)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ("--mode", "two-stage", "--backend", "hf", "output_dir=out", *SMALL, "model_name=tiny-moe",
            "eval_steps=2", "gen_eval_max_samples=4", "mlflow=true")
    first = ok(train(*args, cwd=tmp_path))
    assert_default_mlflow_store(tmp_path / "out")
    s1, s2 = summary(tmp_path / "out", "stage1"), summary(tmp_path / "out", "stage2")
    assert s1["global_step"] == 3 and s2["global_step"] == 3
    for s, stage in ((s1, "stage1"), (s2, "stage2")):
        assert set(s["weight_storage_bytes"]["experts"]) == {"4bit"}  # QLoRA quantizes the experts too
        assert (tmp_path / "out" / stage / "gen_metrics_step2.json").is_file()
    assert "experts 4bit" in first.stdout
    assert s1["data"]["train_file"].endswith("hawks_train.json")
    assert s2["data"]["train_file"].endswith("hawks_train_curriculum.json")
    assert "stage1: 3 steps" in first.stdout and "stage2: 3 steps" in first.stdout
    # stage 2 continues stage 1's adapter: on its first batch its loss is below that of a fresh adapter (the
    # 4-bit base alone: LoRA starts with B = 0) on the same batch
    ok(train("--mode", "single", "--backend", "hf", "output_dir=fresh", *SMALL, "model_name=tiny-moe",
             "load_in_4bit=true", "dtype=bfloat16", "gen_eval=false", cwd=tmp_path))
    fresh = summary(tmp_path / "fresh")
    assert "hawks_train_curriculum.json" in fresh["data"]["train_file"]
    assert s2["train_losses"][0][1] < 0.9 * fresh["train_losses"][0][1]
    # drop stage 2 only: a re-run skips stage 1 and retrains stage 2 from stage 1's adapter
    import shutil

    shutil.rmtree(tmp_path / "out" / "stage2")
    again = ok(train(*args, cwd=tmp_path))
    assert "stage1: already complete" in again.stdout and "continuing the adapter" in again.stdout
    # (not bit-identical: TRL keeps a 4-bit model's LoRA weights in bf16, the saved adapter round-trips
    # through a fresh fp32 PEFT model, and the run starts from a different process state)
    rerun = summary(tmp_path / "out", "stage2")["train_losses"]
    assert abs(rerun[0][1] - s2["train_losses"][0][1]) < 0.01 * s2["train_losses"][0][1]

    # the 4-bit MoE adapter merges into the bf16 base: the experts come out dense and the model answers
    from transformers import AutoModelForCausalLM

    ok(train("export", "--adapter", str(tmp_path / "out" / "stage2" / "adapter"), "--out", "merged", "--merge",
             cwd=tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    experts = merged.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16 and experts.gate_up_proj.ndim == 3


def test_an_unfinished_stage_is_not_restarted_without_resume(tmp_path):
    """A stage folder with a checkpoint and no COMPLETE (a killed run: tests/test_multinode.py kills one and
    resumes it) is refused, before any model loads, unless --resume or --overwrite says what to do."""
    from finetune.config import ConfigError, resolve
    from finetune.stages import plan_stage_dirs, stage_dir, stages_for

    cfg = resolve("single", "tiny", None, {"output_dir": str(tmp_path / "out")}, {})
    stages = stages_for(cfg)
    (stage_dir(cfg, stages[0]) / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds an unfinished run \(latest: checkpoint-2\)\. Pass --resume to "
                                          r"continue it, or --overwrite to start over"):
        plan_stage_dirs(cfg, stages, resume=False, overwrite=False)
    plan_stage_dirs(cfg, stages, resume=True, overwrite=False)  # goes on from checkpoint-2
    plan_stage_dirs(cfg, stages, resume=False, overwrite=True)
    assert not stage_dir(cfg, stages[0]).exists()  # cleared to start over


def test_watchdog_stays_quiet_through_slow_evaluations_and_saves_and_fires_on_a_slow_step(tmp_path):
    """Every evaluation and checkpoint save sleeps past the 3 s step limit, and so does step 2 itself.
    Only the step may raise the alarm: the dumped main thread is in the step, never in the pauses."""
    result = ok(train("--mode", "single", "--backend", "hf", "output_dir=out", *SMALL, "max_steps=2",
                      "eval_steps=1", "save_steps=1", "gen_eval_max_samples=2", "watchdog_step_s=3",
                      "extra_callbacks=trainer_hooks.SlowSteps,trainer_hooks.SlowEvaluationAndSave", cwd=tmp_path,
                      env={"SLOW_FROM_STEP": "1", "SLOW_STEP_SECONDS": "6", "SLOW_EVAL_SECONDS": "4"}))
    log = (tmp_path / "out" / "single" / "watchdog-rank0.log").read_text()
    assert "no optimizer step 2 finished within 3s" in log and "in on_step_begin" in log
    assert 'File "' in log and "Thread" in log and "[watchdog rank 0]" in result.stderr
    assert "in on_evaluate" not in log and "in on_save" not in log and "first optimizer step" not in log
    s = summary(tmp_path / "out")
    assert s["global_step"] == 2 and s["watchdog_dumps"] >= 1
    # the pauses are timed instead: 2 evaluations and 2 saves of >= 4 s each
    assert s["phase_seconds"]["single.evaluations"] >= 8 and s["phase_seconds"]["single.checkpoint_saves"] >= 8
    assert "[time] single.evaluations:" in result.stdout and "(2)" in result.stdout


def test_watchdog_limits_a_pause_by_its_own_timeout(tmp_path):
    """A hung evaluation is still reported (under its own, longer limit), and so is a hung save; a dump
    does not overwrite a deadline the training armed meanwhile."""
    from transformers import TrainerControl, TrainerState

    from callbacks.watchdog import StallWatchdog

    dog = StallWatchdog(60, 60, log_dir=tmp_path, pause_timeout_s=0.4)
    state, control = TrainerState(), TrainerControl()
    dog.on_train_begin(None, state, control)
    state.global_step, control.should_evaluate, control.should_save = 1, True, True
    dog.on_step_end(None, state, control)  # the evaluation and save after step 1 begin
    time.sleep(1.2)
    dog.on_evaluate(None, state, control)
    time.sleep(1.2)
    dog.on_save(None, state, control)
    dog.on_train_end(None, state, control)
    log = (tmp_path / "watchdog-rank0.log").read_text()
    assert "no evaluation after optimizer step 1 finished within 0s" in log
    assert "no checkpoint save after optimizer step 1 finished within 0s" in log
    assert "optimizer step 2" not in log  # the step limit (60 s) was armed again after the save
    assert dog._deadline[2] == "optimizer step 2" and dog._deadline[1] == 60
    assert dog.pauses[0]["evaluation_s"] >= 1.2 and dog.pauses[0]["save_s"] >= 1.2


def _adapter_tensors(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def _abs_sum(folder: Path) -> float:
    return sum(float(t.double().abs().sum()) for t in _adapter_tensors(folder).values())


def assert_generation_eval_gathered(stage: Path, step: int, n: int, cwd: Path) -> dict:
    """The step's generation eval covered n distinct validation records (every rank's shard gathered, none
    twice), and its metrics are what the one metric implementation gives for the predictions written beside
    them, scored against the eval file's own records."""
    from callbacks.generation_eval import score
    from core.records import load_records

    metrics = json.loads((stage / f"gen_metrics_step{step}.json").read_text())
    rows = [json.loads(line) for line in (stage / f"gen_predictions_step{step}.jsonl").open(encoding="utf-8")]
    assert len(rows) == n == metrics["gen_num_examples"] and len({r["id"] for r in rows}) == n
    eval_file = yaml.safe_load((stage / "config.yaml").read_text(encoding="utf-8"))["eval_file"]
    by_id = {r["id"]: r for r in load_records(str(cwd / eval_file))}
    records = [by_id[r["id"]] for r in rows]
    assert all(r["gold"] == record["output"] for r, record in zip(rows, records))
    rescored = score(records, [{"prediction": r["prediction"], "truncated": r["truncated"]} for r in rows])
    assert rescored == pytest.approx({k: v for k, v in metrics.items() if k in rescored}), step
    assert set(rescored) <= set(metrics)
    return metrics


def test_torchrun_two_stage_moe_keeps_the_best_step_under_its_constraint(tmp_path):
    """The user's launch (torchrun, the MoE, packed rows, generation eval mid-run: each rank generates its
    shard, padded batches, the router aux loss on) in two stages whose late steps are wrecked by a huge
    learning rate.
    Each stage keeps the best evaluated step that meets the constraint as adapter/ (the last as
    adapter_last/), and stage 2 continues stage 1's chosen adapter on both ranks."""
    constraint = "gen_truncation_rate<0.9"
    result = ok(train("--mode", "two-stage", "load_in_4bit=false", "dtype=float32", "output_dir=out", *SMALL,
                      "max_steps=6", "model_name=tiny-moe", "eval_steps=2", "save_steps=2", "save_total_limit=3",
                      "packing=true",
                      "gen_eval_max_samples=6", "gen_eval_batch_size=2", "router_aux_loss_coef=0.001",
                      f"best_metric_constraint={constraint}",
                      "extra_callbacks=trainer_hooks.WreckLearningRate,trainer_hooks.RecordAdapterAtStart",
                      cwd=tmp_path, env={"WRECK_FROM_STEP": "4", "WRECK_LR": "5"},
                      launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]))
    assert "Unsloth's CPU fallback runs one process only" in result.stdout  # auto says why it is not Unsloth
    assert result.stdout.count("=== run summary ===") == 1  # only rank 0 prints and writes
    chosen = {}
    for stage in ("stage1", "stage2"):
        out = tmp_path / "out" / stage
        s = summary(tmp_path / "out", stage)
        assert s["world_size"] == 2 and s["backend"] == "hf" and s["global_step"] == 6
        # DDP without its per-backward graph walk: every LoRA tensor of the MoE got a gradient at every step
        # (DDP would fail the next step otherwise)
        assert s["ddp_find_unused_parameters"] is False
        assert s["packing"]["packing"] and s["packing"]["rows"] < s["packing"]["examples"]
        assert s["router_aux_loss"]["on"] and [a[0] for a in s["router_aux_loss"]["aux_losses"]] == [1, 2, 3, 4, 5, 6]
        metrics = {step: assert_generation_eval_gathered(out, step, 6, tmp_path) for step in (2, 4, 6)}
        # the rule, applied to the run's own metric files: constraint met, highest name F1, later on a tie
        met = [step for step, m in metrics.items() if m["gen_truncation_rate"] < 0.9]
        expected = max(met, key=lambda step: (metrics[step]["gen_offender_name_set_f1"], step)) if met else None
        best = s["best"]
        assert best["constraints"] == [constraint] and best["step"] == expected
        assert [(e["step"], e["value"], e["met"]) for e in best["evaluations"]] == [
            (step, m["gen_offender_name_set_f1"], step in met) for step, m in metrics.items()]
        assert json.loads((out / "best.json").read_text())["evaluations"] == best["evaluations"]
        # the checkpoints hold each step's adapter as trained: adapter/ is the chosen one, adapter_last/ the last
        for folder, step in (("adapter", best["adapter_step"]), ("adapter_last", 6)):
            held, at_step = _adapter_tensors(out / folder), _adapter_tensors(out / f"checkpoint-{step}")
            assert held.keys() == at_step.keys() and all(torch.equal(held[k], at_step[k]) for k in held)
        assert not (out / "adapter_best").exists()
        chosen[stage] = best["adapter_step"]
    # the wrecked steps fail the constraint, so stage 1 keeps an earlier step; stage 2 starts from it on each rank
    s1 = tmp_path / "out" / "stage1"
    assert json.loads((s1 / "gen_metrics_step6.json").read_text())["gen_truncation_rate"] >= 0.9
    assert chosen["stage1"] in (2, 4)
    starts = [json.loads((tmp_path / "out" / "stage2" / f"adapter_at_start-{rank}.json").read_text())
              for rank in (0, 1)]
    assert starts[0] == starts[1] == pytest.approx(_abs_sum(s1 / "adapter"), rel=1e-9)
    assert starts[0] != pytest.approx(_abs_sum(s1 / "adapter_last"), rel=1e-3)
    assert f"continuing the adapter of out/stage1/adapter (step {chosen['stage1']}" in result.stdout
    assert f"adapter/ = step {chosen['stage1']}, highest gen_offender_name_set_f1 where {constraint}" in result.stdout
    assert f"adapter: out/stage2/adapter (step {chosen['stage2']})" in result.stdout


def test_group_by_length_batches_carry_less_padding(tmp_path, monkeypatch):
    """group_by_length=true: transformers' length-grouped sampler in the trainer's own dataloader."""
    from data_tools.synth import generate
    from finetune.config import resolve
    from finetune.data import stage_data
    from finetune.model import load_base
    from finetune.run_plan import decide_here
    from finetune.stages import sft_trainer, stages_for

    monkeypatch.chdir(tmp_path)
    records = generate(0, "train", "positive", 48) + generate(0, "train", "negative", 48)
    shares = {}
    for grouped in ("false", "true"):
        cfg = resolve("single", "tiny", None, {"eval_file": "", "group_by_length": grouped}, {}, None)
        plan = decide_here(cfg, "hf")[0]
        model, tokenizer = load_base(cfg, plan)
        trainer = sft_trainer(cfg, stages_for(cfg)[0], tmp_path / grouped, plan, model, tokenizer,
                              stage_data(cfg, records, [], tokenizer))
        assert trainer.args.train_sampling_strategy == ("group_by_length" if grouped == "true" else "random")
        batches = list(trainer.get_train_dataloader())
        assert sum(len(b["input_ids"]) for b in batches) == len(records)  # every example, once
        shares[grouped] = sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["input_ids"].numel()
                                                                                    for b in batches)
    # 96 examples are one mega-batch; python -m bench.padding measures the full mix (0.99 vs 0.73).
    assert shares["true"] > shares["false"] + 0.05, shares


def test_export_writes_a_model_card_of_the_run_and_a_failed_push_keeps_the_export(single_hf, tmp_path):
    """The card holds what the run recorded: its exported step's generation metrics, its data's hashes and
    sizes, its settings. The push itself needs the Hub (not reachable here): offline, it fails in one line
    after the export is complete, and the token is not printed."""
    from core.metrics import HEADLINE

    cwd, _ = single_hf
    stage = cwd / "out" / "single"
    s = summary(cwd / "out")
    result = train("export", "--adapter", str(stage / "adapter"), "--out", str(tmp_path / "card"),
                   "--push-to-hub", "someone/offenders", cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_notarealtoken123"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: push to the Hub repository someone/offenders failed" in result.stderr
    assert f"the export is complete in {tmp_path / 'card'}" in result.stderr
    assert "hf_notarealtoken123" not in result.stdout + result.stderr
    card = (tmp_path / "card" / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---")[1])
    model_name = yaml.safe_load((stage / "config.yaml").read_text(encoding="utf-8"))["model_name"]
    assert front["base_model"] == model_name and front["library_name"] == "peft" and front["language"] == ["ja"]
    assert front["license"] == "apache-2.0"
    step = (s.get("best") or {}).get("adapter_step") or s["global_step"]
    metrics = json.loads((stage / f"gen_metrics_step{step}.json").read_text())
    assert f"At the exported step ({step}), on {metrics['gen_num_examples']} validation records" in card
    for name in HEADLINE:
        assert f"| {name} | {float(metrics[name]):.4f} |" in card, name
    assert f"| single | train | `{Path(s['data']['train_file']).name}` | 48 | `{s['data']['train_sha256'][:16]}` |" in card
    assert "| lora_r | 16 |" in card and "| mode | single |" in card
    assert "## Intended use and limits" in card and "presumed innocent" in card
