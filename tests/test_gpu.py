"""GPU-only checks (`pytest -m gpu`; skipped without CUDA): the real `qwen_finetune.py` on the
Qwen3-30B-A3B architecture cut to 2 layers (its widths, 128 experts, top-8; random weights saved and
loaded with from_pretrained, built by bench/gpu.py), the way the user runs it: generation eval on
padded batches mid-run, checkpoints, `--resume`; on both backends, bf16 and 4-bit. With two GPUs
also `torchrun` + DeepSpeed ZeRO-2. What the CPU tests cannot reach: CUDA kernels, bitsandbytes
and Unsloth's GPU paths, the real widths and expert count.
"""

import json
import math
import signal
import sys

import pytest
import torch
from safetensors import safe_open

from test_trainer import REPO, assert_generation_eval_gathered, ok, summary, train

if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU (torch.cuda.is_available() is False)", allow_module_level=True)

from bench.gpu import build_model, moe_config

pytestmark = pytest.mark.gpu

# 6 steps of 4 examples; an evaluation (eval loss + generation eval of 8 records in batches of 4) and a
# checkpoint every 2 steps: mid-run evaluations and checkpoints before the end.
RUN = ["--mode", "single", "max_train_samples=48", "max_steps=6", "eval_steps=2", "save_steps=2",
       "eval_max_samples=8", "gen_eval_max_samples=8", "gen_eval_batch_size=4", "micro_batch_size=4",
       "gradient_accumulation_steps=1", "logging_steps=1", "dtype=bfloat16", "gradient_checkpointing=true"]
PRECISION = {"bf16": "load_in_4bit=false", "4bit": "load_in_4bit=true"}
# A checkpoint file holds at most fp32 LoRA weights (4 bytes a parameter), Adam's two moments (8) or a
# ZeRO shard of both: under 16 bytes per trainable parameter (27M here: 0.43 GB). The base weights are
# 3.7 GB, its embeddings alone 1.2 GB.
BYTES_PER_TRAINABLE = 16


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-30b-a3b-2-layers")
    build_model(path, moe_config(2))
    return path


def assert_trains_and_evaluates(out, cwd, steps=(2, 4, 6)) -> dict:
    """Every step logged a finite loss; the eval loss on the same records fell from the first evaluation to
    the last (the tiny preset's learning rate, 4e-3, on random weights); each generation eval covered every
    record once and its metrics are the metric implementation's own for the predictions it wrote."""
    s = summary(out)
    stage = out / "single"
    assert s["global_step"] == steps[-1] and [step for step, _ in s["train_losses"]] == list(range(1, steps[-1] + 1))
    assert all(math.isfinite(loss) for _, loss in s["train_losses"]), s["train_losses"]
    state = json.loads((stage / f"checkpoint-{steps[-1]}" / "trainer_state.json").read_text())
    eval_losses = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert list(eval_losses) == list(steps) and eval_losses[steps[-1]] < eval_losses[steps[0]], eval_losses
    for step in steps:  # mid-run and at the end, gathered from every rank
        assert_generation_eval_gathered(stage, step, 8, cwd)
    return s


def assert_adapter_only(stage, trainable: int) -> None:
    """Checkpoints and adapter/ carry the LoRA weights and their optimizer state, never base weights."""
    folders = [*stage.glob("checkpoint-*"), stage / "adapter"]
    assert len(folders) >= 2, folders
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert path.stat().st_size < BYTES_PER_TRAINABLE * trainable + 2 ** 20, path
        adapters = list(folder.rglob("adapter_model.safetensors"))
        assert adapters, folder
        for path in adapters:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
            assert keys and [k for k in keys if "lora" not in k] == [], path


@pytest.mark.parametrize("precision", PRECISION)
@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_moe_trains_evaluates_checkpoints_and_resumes(moe_dir, tmp_path, backend, precision):
    """Run 1 stops itself (SIGTERM to its own process group, made its own by setsid) when step 6 ends, after
    checkpoint-4 and step 5's logged loss; run 2 `--resume`s from checkpoint-4 and trains steps 5 and 6 only,
    step 5 from the same weights, optimizer state and batch as run 1: the same loss, up to GPU rounding."""
    args = ["--backend", backend, f"model_name={moe_dir}", "output_dir=out", *RUN, PRECISION[precision]]
    stage = tmp_path / "out" / "single"
    hooks = "extra_callbacks=trainer_hooks.RecordTrainingState,trainer_hooks.RecordLosses"
    first = train(*args, hooks.replace("=", "=trainer_hooks.KillProcessAt,"), cwd=tmp_path,
                  launcher=["setsid", "-w", sys.executable], env={"KILL_AT_STEP": "6", "KILL_PGID": "0"})
    assert first.returncode == -signal.SIGTERM, first.stdout[-3000:] + first.stderr[-3000:]
    assert (stage / "checkpoint-4" / "trainer_state.json").is_file() and not (stage / "checkpoint-6").exists()
    assert not (stage / "COMPLETE").exists()
    killed = {r["step"]: r["loss"] for r in map(json.loads, (stage / "losses_seen.jsonl").open())}
    assert sorted(killed) == [1, 2, 3, 4, 5]

    resumed = ok(train(*args, hooks, "--resume", cwd=tmp_path))
    assert any("resuming from" in line and line.endswith("checkpoint-4") for line in resumed.stdout.splitlines())
    s = assert_trains_and_evaluates(tmp_path / "out", tmp_path)
    assert dict(s["train_losses"])[5] == pytest.approx(killed[5], rel=2e-2), (s["train_losses"], killed)
    assert dict(s["train_losses"])[4] == killed[4]  # from checkpoint-4's log history
    assert s["backend"] == backend
    # one row per finished step across both processes: 1-5 before the kill (step 6 ends in it), 5 and 6
    # after the resume; the generation evals (Unsloth's switch to inference and back) left training as it was
    rows = [json.loads(line) for line in (stage / "training_state.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5, 6]
    assert all({k: v for k, v in r.items() if k != "step"} == {k: v for k, v in rows[0].items() if k != "step"}
               for r in rows)
    storage = s["weight_storage_bytes"]
    assert set(storage["experts"]) == ({"4bit"} if precision == "4bit" else {"bfloat16"}), storage
    assert_adapter_only(stage, s["trainable_parameters"]["trainable"])


def test_two_stage_killed_in_stage2_resumes_without_retraining_stage1(moe_dir, tmp_path):
    """The 4-bit two-stage run at real widths (backend auto), killed after stage 2's checkpoint-4: --resume
    keeps the complete stage 1 and trains stage 2's steps 5 and 6 only."""
    args = ["--mode", "two-stage", f"model_name={moe_dir}", "output_dir=out", *RUN[2:], "load_in_4bit=true"]
    first = train(*args, "extra_callbacks=trainer_hooks.KillProcessAt", cwd=tmp_path,
                  launcher=["setsid", "-w", sys.executable],
                  env={"KILL_AT_STEP": "5", "KILL_PGID": "0", "KILL_IN_STAGE": "stage2"})
    assert first.returncode == -signal.SIGTERM, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "stage1" / "COMPLETE").exists() and not (out / "stage2" / "COMPLETE").exists()
    stage1_summary = (out / "stage1" / "run_summary.json").read_text()
    resumed = ok(train(*args, "--resume", cwd=tmp_path))
    assert (out / "stage1" / "run_summary.json").read_text() == stage1_summary  # not retrained
    assert any("resuming from" in line and line.endswith("checkpoint-4") for line in resumed.stdout.splitlines())
    s = summary(out, "stage2")
    assert s["global_step"] == 6 and [step for step, _ in s["train_losses"]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("zero2", ["zero2_no_offload.json", "zero2.json"])
def test_torchrun_one_gpu_deepspeed_zero2_saves_and_resumes(moe_dir, tmp_path, zero2):
    """torchrun with one rank under each shipped ZeRO-2 config (zero2.json offloads AdamW: DeepSpeed's CPU
    Adam compiles on first use), killed after checkpoint-4 and resumed from it."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -r requirements-gpu.txt)")
    args = [f"model_name={moe_dir}", "output_dir=out", *RUN, "load_in_4bit=false",
            "--deepspeed", str(REPO / "deepspeed_configs" / zero2)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone"]
    first = train(*args, "extra_callbacks=trainer_hooks.KillProcessAt", cwd=tmp_path,
                  launcher=["setsid", "-w", *torchrun], env={"KILL_AT_STEP": "5", "KILL_PGID": "0"})
    assert first.returncode != 0 and (tmp_path / "out" / "single" / "checkpoint-4").is_dir(), first.stderr[-3000:]
    assert any((tmp_path / "out" / "single" / "checkpoint-4").glob("global_step*"))  # a DeepSpeed checkpoint
    resumed = ok(train(*args, "--resume", cwd=tmp_path, launcher=torchrun))
    assert any("resuming from" in line and line.endswith("checkpoint-4") for line in resumed.stdout.splitlines())
    s = assert_trains_and_evaluates(tmp_path / "out", tmp_path)
    assert s["world_size"] == 1


def test_torchrun_two_gpus_deepspeed_zero2(moe_dir, tmp_path):
    """The user's multi-GPU launch (backend auto, as in the README), generation eval sharded over the ranks."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs (torch.cuda.device_count() is {torch.cuda.device_count()})")
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -r requirements-gpu.txt)")
    ok(train(f"model_name={moe_dir}", "output_dir=out", *RUN, "load_in_4bit=false",
             "--deepspeed", str(REPO / "deepspeed_configs" / "zero2.json"), cwd=tmp_path,
             launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]))
    s = assert_trains_and_evaluates(tmp_path / "out", tmp_path)
    assert s["world_size"] == 2
    assert_adapter_only(tmp_path / "out" / "single", s["trainable_parameters"]["trainable"])


@pytest.mark.parametrize("backend,model", [("unsloth", "tiny-dense"), ("unsloth", "tiny-moe"), ("hf", "tiny-moe")])
def test_packed_examples_stay_apart_on_cuda(backend, model):
    """tests/packing_check.py on CUDA, micro-batch 2. Unsloth runs dense Qwen3 with its own attention, which
    ignores transformers' masks and reads example boundaries from the position ids of a one-row batch only,
    so there the rows must arrive flattened (finetune/run_plan.py); it leaves Qwen3-MoE to
    transformers' modeling. Either way each trained token's loss must equal its loss with the example alone."""
    from packing_check import run as packing_check

    r = packing_check(backend, model, timeout=900)
    assert r["model_attention"] == r["attention"] == "sdpa", r  # float32: flash-attn has no kernel for it
    if (backend, model) == ("unsloth", "tiny-dense"):
        assert r["rows_in_first_batch"] == 1 and r["collator"] == "DataCollatorForLanguageModeling", r
    assert r["examples_in_first_batch"] >= 4 and r["control_diff_without_restart"] > 0.1
    # float32 weights; the GPU's kernels differ from the one-example pass by rounding only
    assert r["max_token_loss_diff"] < 1e-2 and r["max_token_loss_diff_flattened"] < 1e-2, r
    assert r["max_relative_gradient_diff"] < 1e-3, r


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_packed_examples_stay_apart_in_bfloat16(backend):
    """The production preset's setting: the MoE in bfloat16, where auto attention is flash-attn when it
    imports (TRL's flattened padding-free rows, its varlen kernel), else sdpa with side-by-side rows.
    Whichever it is, the model runs that one, and packing changes no trained token's loss beyond bf16
    rounding while a leak across examples (the control) moves it far more."""
    from packing_check import run as packing_check

    from finetune.run_plan import flash_attention_works

    r = packing_check(backend, "tiny-moe", "auto", "bfloat16", timeout=900)
    expected = "flash_attention_2" if flash_attention_works() else "sdpa"
    assert r["model_attention"] == r["attention"] == expected, r
    # on this CPU in bf16 (sdpa_varlen): token diff 0, control 11.1, gradient 0.002
    assert r["examples_in_first_batch"] >= 4 and r["control_diff_without_restart"] > 1.0, r
    assert r["max_token_loss_diff"] < 0.25 and r["max_token_loss_diff_flattened"] < 0.25, r
    assert r["max_relative_gradient_diff"] < 0.05, r
