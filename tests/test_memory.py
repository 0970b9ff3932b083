"""The memory plan (finetune/memory.py, finetune/memory_plan.py): its arithmetic on round numbers, the launcher `deepspeed=auto`
chooses, the verdict and its ways out, the real run's refusal before loading, and its prediction against
tensor-level measurements of a narrow MoE on this CPU (bench/memory.py, the same comparison the real-width
bench makes)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune import run_plan
from finetune.config import ConfigError, resolve
from finetune.memory import GIB, ZERO2_OFFLOAD, ZERO2_ON_GPU, Launcher, Shape, estimate, launcher_of, resident
from finetune.memory_plan import Workload, deepspeed_candidates, plan

REPO = Path(__file__).resolve().parent.parent
P = GIB  # trainable parameters: each byte per parameter is then 1 GiB
SHAPE = Shape(layers=4, hidden=1024, vocab=1000, heads=8, kv_heads=2, head_dim=128, experts=0, top_k=0,
              expert_width=2048, base_bytes=40 * GIB, lora_params=P)


@pytest.mark.parametrize("launcher, weights, grads, optimizer", [
    (Launcher(world=1), 4, 4, 8),                    # one process: fp32 LoRA, grads, two fp32 moments
    (Launcher(world=4), 4, 4 + 4, 8),                # DDP: the gradient buckets double the gradients
    (Launcher(2, False, 4), 2, 1, 3),                # ZeRO-2: bf16 module; grads, master + moments / 4
    (Launcher(2, True, 4), 2, 0, 0),                 # offloaded: grads and optimizer in CPU memory
    (Launcher(1, False, 4), 2, 2, 3),                # ZeRO-1: the optimizer sharded only
])
def test_resident_training_state_follows_the_launcher(launcher, weights, grads, optimizer):
    held = resident(SHAPE, launcher)
    assert held == {"weights": 40 * GIB, "lora_weights": weights * GIB, "lora_grads": grads * GIB,
                    "optimizer": optimizer * GIB}
    # the 4-bit hf path keeps LoRA in bf16 (measured): half of everything LoRA
    if not launcher.zero_stage:
        half = resident(replace(SHAPE, lora_bytes=2), launcher)
        assert half["optimizer"] == optimizer * GIB / 2 and half["lora_weights"] == weights * GIB / 2


def test_launcher_is_read_from_the_deepspeed_file(tmp_path):
    assert launcher_of(str(ZERO2_OFFLOAD), 4) == Launcher(2, True, 4, str(ZERO2_OFFLOAD))
    assert launcher_of(str(ZERO2_ON_GPU), 4) == Launcher(2, False, 4, str(ZERO2_ON_GPU))
    assert launcher_of("", 4) == Launcher(world=4)


def test_kv_cache_and_the_peaks_of_the_generation_eval():
    # 16 sequences x (1000 + 24) tokens x 4 layers x K,V x 2 heads x 128 x 2 bytes = 64 MiB
    est = estimate(SHAPE, Launcher(), tokens=2048, gen_batch=16, prompt_tokens=1000, new_tokens=24)
    assert est.generation["kv_cache"] == 64 * 2 ** 20
    assert "lora_grads" not in est.generation and est.generation["optimizer"] == 8 * GIB
    assert est.generation_peak == pytest.approx(sum(est.generation.values()) + est.overhead)
    assert estimate(SHAPE, Launcher(), tokens=2048).generation == {}  # no generation eval: no peak


def test_one_training_phase_at_a_time_and_the_first_step_without_optimizer_state():
    moe = replace(SHAPE, vocab=151936, experts=128, top_k=8, expert_width=768, expert_fold_weights=128 * 3 * 768 * 1024,
                  fold="peft")
    steady = estimate(moe, Launcher(), tokens=1536, gpu=False, trained_tokens=100)
    # the fold of one layer's experts (7 bytes a weight in its backward) outweighs the head on 100 tokens
    assert "layer_backward" in steady.training and "lm_head_loss" not in steady.training
    first = estimate(moe, Launcher(), tokens=1536, gpu=False, trained_tokens=100, first_step=True)
    assert steady.training_peak - first.training_peak == 8 * GIB
    many = estimate(moe, Launcher(), tokens=1536, gpu=False, trained_tokens=1536)
    assert "lm_head_loss" in many.training and "layer_backward" not in many.training


def test_deepspeed_auto_picks_zero2_for_bf16_lora_on_several_gpus_only(tmp_path):
    cfg = resolve("single", "qwen3-30b-a3b", None, {}, {}, None, dry_run=True)
    assert cfg.deepspeed == "auto"
    assert deepspeed_candidates(cfg, 4, gpu=True)[0] == [str(ZERO2_ON_GPU), str(ZERO2_OFFLOAD)]
    assert deepspeed_candidates(cfg, 1, gpu=True)[0] == [""]
    assert deepspeed_candidates(cfg, 4, gpu=False)[0] == [""]  # the CPU torchrun tests stay DDP
    two = resolve("two-stage", "qwen3-30b-a3b", None, {}, {}, None, dry_run=True)
    assert deepspeed_candidates(two, 4, gpu=True) == ([""], "auto: 4-bit weights cannot be sharded by ZeRO; DDP")
    named = replace(cfg, deepspeed=str(ZERO2_OFFLOAD))
    assert deepspeed_candidates(named, 4, gpu=True)[0] == [str(ZERO2_OFFLOAD)]
    assert deepspeed_candidates(replace(cfg, deepspeed="none"), 4, gpu=True)[0] == [""]


def test_plan_prefers_the_optimizer_on_the_gpu_and_offloads_only_when_that_alone_fits():
    cfg = resolve("single", "qwen3-30b-a3b", None, {}, {}, None, dry_run=True)
    work = Workload(tokens=1536, gen_batch=16, prompt_tokens=300, new_tokens=200)
    big = replace(SHAPE, lora_params=4 * GIB)  # ZeRO-2 on the GPU holds 3 bytes/param on 4 ranks: 12 GiB more
    assert plan(replace(cfg, device_memory_gib=80), big, 4, work).deepspeed == str(ZERO2_ON_GPU)
    tight = plan(replace(cfg, device_memory_gib=64), big, 4, work)
    assert tight.deepspeed == str(ZERO2_OFFLOAD) and tight.fits
    over = plan(replace(cfg, device_memory_gib=40), big, 4, work,
                four_bit=replace(big, base_bytes=12 * GIB, lora_bytes=2))
    assert not over.fits and over.options
    assert any(change.startswith("--mode two-stage") for change, _ in over.options)
    assert all(line.endswith(("(fits)", "(still over)")) for line in over.describe_options())


def offline(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "QWEN_FINETUNE_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(REPO / "qwen_finetune.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_users_command_fits_an_80gb_card_and_a_40gb_one_gets_the_ways_out(tmp_path):
    """`torchrun --nproc_per_node=4 qwen_finetune.py --mode single --preset qwen3-30b-a3b`, no DeepSpeed
    flag, planned offline on a fresh clone: ZeRO-2 is chosen and both peaks stay under 72 GiB."""
    reports = {}
    for name, extra in (("80", ()), ("40", ("device_memory_gib=40",))):
        result = offline(tmp_path, "--mode", "single", "--preset", "qwen3-30b-a3b", "--dry-run", "--nproc", "4",
                         *extra)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        reports[name] = (json.loads(result.stdout.strip().splitlines()[-1])["memory"], result.stdout)
    memory, out = reports["80"]
    assert memory["fits"] is True and memory["device_gib"] == 80
    assert memory["training_peak_gib"] <= 72 and memory["gen_eval_peak_gib"] <= 72
    assert memory["launcher"] == "ZeRO-2" and memory["deepspeed"].endswith("zero2_no_offload.json")
    assert "fits a device of 80 GiB" in out
    memory, out = reports["40"]
    assert memory["fits"] is False and memory["options"]
    assert "does NOT fit a device of 40 GiB" in out and "  instead    --mode two-stage" in out


def test_a_gpu_run_that_does_not_fit_stops_before_loading(tmp_path, monkeypatch):
    import torch

    from finetune import checks

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QWEN_FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = resolve("single", "qwen3-30b-a3b", None, {"device_memory_gib": "80", "backend": "hf"}, {}, None,
                  dry_run=True)
    assert cfg.gen_eval_batch_size == 0  # the preset's auto
    four_gpus = run_plan.decide(cfg, SimpleNamespace(model_type="qwen3_moe"),
                                run_plan.Machine(gpu=True, world=4, nodes=1, unsloth_installed=False))
    checks.check_memory(cfg, four_gpus)  # fits: auto becomes the ZeRO-2 file the plan chose
    assert cfg.deepspeed == str(ZERO2_ON_GPU)
    # and the generation batch the largest that fits: prompts bounded by max_length without an eval set
    assert cfg.gen_eval_batch_size == 16
    small = resolve("single", "qwen3-30b-a3b", None, {"device_memory_gib": "40", "backend": "hf"}, {}, None,
                    dry_run=True)
    with pytest.raises(ConfigError) as e:
        checks.check_memory(small, four_gpus)
    assert "would not fit the GPU" in str(e.value) and "--mode two-stage" in str(e.value)
    assert "check_memory=false" in str(e.value)
    checks.check_memory(replace(small, check_memory=False), four_gpus)  # the explicit override runs it anyway


def test_prediction_matches_tensor_measurement_of_a_narrow_moe(tmp_path):
    """bench/memory.py on a narrow Qwen3-MoE (hidden 512, 16 experts; 2 layers), bf16 and 4-bit: every
    peak predicted within 15% of what torch's MemTracker measured, and the optimizer state to 1e-4."""
    out = tmp_path / "measured.json"
    narrow = "hidden_size=512,num_experts=16,moe_intermediate_size=192,num_attention_heads=8," \
             "num_key_value_heads=2,head_dim=64"
    result = subprocess.run([sys.executable, "-m", "bench.memory", "--layers", "2", "--gen-batch", "4",
                             "--max-length", "512", "--narrow", narrow, "--json", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "QWEN_FINETUNE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    for precision, r in json.loads(out.read_text()).items():
        predicted_train = sum(r["predicted"]["training"].values())
        predicted_gen = sum(r["predicted"]["generation"].values())
        assert 0.85 <= predicted_train / r["train"]["peak"]["Total"] <= 1.15, (precision, r)
        assert 0.85 <= predicted_gen / r["gen"]["peak"]["Total"] <= 1.15, (precision, r)
        # AdamW's moments per trainable parameter, counted on the meta model (within a few parameters)
        assert r["predicted"]["generation"]["optimizer"] == pytest.approx(r["train"]["after"]["_MemRefType.OPT"],
                                                                          rel=1e-4), precision
    assert result.stdout.strip().splitlines()[-1].startswith("peak: predicted ")


def test_a_resumed_stage_keeps_the_launcher_its_checkpoint_was_saved_with(tmp_path):
    from finetune.checks import resumed_launcher
    from finetune.stages import stages_for

    cfg = resolve("single", "qwen3-30b-a3b", None, {"output_dir": str(tmp_path / "out")}, {}, None, dry_run=True)
    stages = stages_for(cfg)
    assert resumed_launcher(cfg, stages) is None  # nothing to resume: the plan decides
    checkpoint = tmp_path / "out" / "single" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    assert resumed_launcher(cfg, stages) == "none"  # saved under DDP: resuming under DeepSpeed would fail
    (checkpoint / "global_step4").mkdir()
    assert resumed_launcher(cfg, stages) is None  # saved by DeepSpeed: ZeRO-2 again


def test_auto_generation_batch_is_the_largest_that_fits_after_the_launcher_and_16_on_a_cpu(monkeypatch):
    from finetune import checks

    moe = replace(SHAPE, layers=48, hidden=2048, kv_heads=4, experts=128, top_k=8, expert_width=768,
                  base_bytes=57 * GIB, lora_params=642_514_944)
    cfg = resolve("single", "qwen3-30b-a3b", None, {"device_memory_gib": "80"}, {}, None, dry_run=True)
    short = Workload(tokens=1536, gen_batch=64, prompt_tokens=300, new_tokens=200, gen_batch_auto=True)
    chosen = plan(cfg, moe, 4, short)
    assert chosen.fits and chosen.gen_batch == 64 and chosen.deepspeed == str(ZERO2_ON_GPU)
    # prompts as long as max_length: a smaller batch, on the same (faster) launcher rather than offloading
    long = plan(cfg, moe, 4, replace(short, prompt_tokens=1536, new_tokens=1552))
    assert long.fits and long.gen_batch < 64 and long.deepspeed == str(ZERO2_ON_GPU)
    assert plan(cfg, moe, 4, replace(short, prompt_tokens=1536, new_tokens=1552, gen_batch=32,
                                     gen_batch_auto=False)).gen_batch == 32  # a batch set by the user is kept
    assert chosen.report()["gen_eval_batch_size"] == 64 and chosen.report()["gen_eval_batch_size_auto"]
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cpu = run_plan.decide(cfg, SimpleNamespace(model_type="qwen3_moe"),
                          run_plan.Machine(gpu=False, world=1, nodes=1, unsloth_installed=False))
    assert checks.check_memory(cfg, cpu) is None and cfg.gen_eval_batch_size == 16
