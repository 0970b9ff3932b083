"""The production launch's multi-rank paths, on CPU: `torchrun` with two processes over gloo and the
shipped DeepSpeed ZeRO-2 config, on the tiny MoE with the generation eval on.

What only a real multi-rank run shows: the process group carries the configured timeout, a checkpoint
copies no base weights (accelerate's whole-model state dict is never taken), a second stage trains the
model without the first stage's DeepSpeed engine, and a resumed ZeRO-2 run is the run it replaced.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_trainer import REPO, SMALL, _abs_sum, ok, summary, train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]


@pytest.fixture(scope="module")
def zero2_config() -> Path:
    """The shipped ZeRO-2 config that `deepspeed=auto` picks first (the optimizer shard on the device,
    the trainer's own AdamW); zero2.json's CPU offload compiles DeepSpeedCPUAdam on first use (minutes)."""
    return REPO / "deepspeed_configs" / "zero2_no_offload.json"


def test_zero2_two_stage_releases_stage1_checkpoints_hold_the_adapter_and_resume_is_the_same_run(
        tmp_path, zero2_config):
    """Two-stage in bf16-style LoRA (4-bit cannot be sharded by ZeRO), stage 2 training the same model
    again: stage 1's engine must be gone (its hooks would reduce every gradient a second time)."""
    pytest.importorskip("deepspeed")
    args = ["--mode", "two-stage", "load_in_4bit=false", "output_dir=out", *SMALL, "max_steps=4", "eval_steps=2",
            "save_steps=2", "save_total_limit=3", "gen_eval_max_samples=4", "gen_eval_batch_size=2",
            "ddp_timeout=777",
            "extra_callbacks=trainer_hooks.RecordRanks,trainer_hooks.RecordStageRelease,trainer_hooks.RecordAdapterAtStart",
            "--deepspeed", str(zero2_config)]
    result = ok(train(*args, cwd=tmp_path, launcher=TORCHRUN))
    assert result.stdout.count("=== run summary ===") == 1
    s1, s2 = summary(tmp_path / "out", "stage1"), summary(tmp_path / "out", "stage2")
    assert s1["world_size"] == 2 and s1["global_step"] == 4 and s2["global_step"] == 4
    # stage 2 continues stage 1's chosen adapter on both ranks: the LoRA weights it starts from are those
    # of stage1/adapter (bf16 under ZeRO-2, so to rounding), not a fresh adapter's (B = 0)
    starts = [json.loads((tmp_path / "out" / stage / f"adapter_at_start-{rank}.json").read_text())
              for stage in ("stage1", "stage2") for rank in (0, 1)]
    assert starts[2] == starts[3] == pytest.approx(_abs_sum(tmp_path / "out" / "stage1" / "adapter"), rel=2e-3)
    assert starts[0] == starts[1] and starts[2] != pytest.approx(starts[0], rel=1e-2)
    # stage 1's optimizer is collected before stage 2 starts (automatic gc is off in this run)
    assert json.loads((tmp_path / "out" / "stage2" / "earlier_optimizers_alive.json").read_text()) == [False]

    stage = tmp_path / "out" / "stage2"
    assert (stage / "gen_metrics_step2.json").is_file()  # a generation eval mid-run, both ranks' shards
    assert json.loads((stage / "gen_metrics_step4.json").read_text())["gen_num_examples"] == 4
    # the process group is ours, created before the trainer: it must carry ddp_timeout, not a default
    for rank in (0, 1):
        rows = [json.loads(line) for line in (stage / f"ranks-{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4]
        assert all(r["backend"] == "gloo" and r["timeout_s"] == 777 for r in rows)
        assert all(r["state_dict_copies"] == 0 for r in rows)  # no whole-model copy to host per checkpoint
    for step in (2, 4):
        checkpoint = stage / f"checkpoint-{step}"
        adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
        assert adapter and all("lora_" in key for key in adapter)
        assert not list(checkpoint.glob("model*.safetensors"))
        engine = sorted(p.name for p in (checkpoint / f"global_step{step}").iterdir())  # what --resume reads
        assert [n for n in engine if n.endswith("model_states.pt")] == ["mp_rank_00_model_states.pt"]
        assert len([n for n in engine if n.endswith("optim_states.pt")]) == 2, engine  # one shard per rank

    # as if the run had been stopped after stage 2's checkpoint at step 2
    shutil.rmtree(stage / "checkpoint-4")
    (stage / "COMPLETE").unlink()
    resumed = ok(train(*args, "--resume", cwd=tmp_path, launcher=TORCHRUN))
    assert "stage1: already complete" in resumed.stdout
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    again = summary(tmp_path / "out", "stage2")
    # steps 1-2 come from the checkpoint's log; 3-4 are new: same data order, schedule and optimizer state
    assert [step for step, _ in again["train_losses"]] == [1, 2, 3, 4]
    for (step, loss), (_, first) in zip(again["train_losses"], s2["train_losses"]):
        assert loss == pytest.approx(first, rel=1e-3), (step, loss, first)
