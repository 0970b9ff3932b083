"""The time plan (finetune/timing.py): its roofline arithmetic on round numbers, how the generation eval's
batches decode, and the production preset's evaluation share in the dry run on the full-scale synthetic mix
with Qwen3's tokenizer."""

import math
from dataclasses import replace

import pytest

from finetune.memory import GIB, Shape
from finetune.timing import (FOLD_TRAFFIC, GPUS, Rates, decode_step_bytes, decode_step_seconds, eval_cost,
                             evaluations, experts_touched, gpu_rates, time_plan, train_flops)
from tests.test_preflight import offline_dry_run, report_of

# Qwen3-30B-A3B's widths at 2 layers
MOE = Shape(layers=2, hidden=2048, vocab=151936, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8,
            expert_width=768, base_bytes=4 * GIB, lora_params=0)
ONE_EXPERT = 3 * 2048 * 768
# round rates: 1 TFLOP/s, 1 TB/s, all of it, no launch cost
UNIT = Rates("unit", 1e12, 1e12, matmul_share=1.0, bandwidth_share=1.0, layer_overhead_s=0.0)


def test_experts_a_batch_touches():
    assert experts_touched(MOE, 1) == pytest.approx(8)
    assert experts_touched(MOE, 16) == pytest.approx(128 * (1 - (120 / 128) ** 16))  # ~64% of them
    assert experts_touched(MOE, 1000) == pytest.approx(128, rel=1e-6)
    assert [experts_touched(MOE, n) for n in (1, 2, 4, 8)] == sorted(experts_touched(MOE, n) for n in (1, 2, 4, 8))


def test_a_decode_step_reads_the_touched_experts_and_peft_refolds_all_of_them():
    plain = decode_step_bytes(MOE, 1, context=0)
    # batch 1: attention (q, o 2048x4096; k, v 2048x512) and router, 8 experts, the LM head; bf16
    attention = 2048 * (2 * 4096 + 2 * 512) + 2048 * 128
    assert plain == pytest.approx(2 * (2 * attention + 2 * 8 * ONE_EXPERT) + 2 * 151936 * 2048)
    folded = decode_step_bytes(replace(MOE, fold="peft"), 1, context=0)
    assert folded - plain == pytest.approx(2 * 128 * ONE_EXPERT * FOLD_TRAFFIC["peft"])
    # at the preset's batch the fold is most of a step: the reason bigger generation batches pay
    assert folded / decode_step_bytes(MOE, 16, context=0) > 4
    # the KV cache: K and V, 4 heads of 128, bf16, per row and token of context, per layer
    assert decode_step_bytes(MOE, 4, context=100) - decode_step_bytes(MOE, 4, context=0) == \
        pytest.approx(2 * 4 * 100 * 2 * 4 * 128 * 2)
    assert decode_step_seconds(MOE, UNIT, 1, 0) == pytest.approx(plain / 1e12)
    assert decode_step_seconds(MOE, replace(UNIT, layer_overhead_s=1e-3), 1, 0) == pytest.approx(plain / 1e12 + 2e-3)


def test_training_flops_per_token_and_the_fold():
    tokens = 1000
    flops = train_flops(MOE, tokens, context=0, rank=16, checkpointing=True)
    attention = 2048 * (2 * 4096 + 2 * 512) + 2048 * 128
    # forward, input gradients, recomputed forward: 3 x 2 FLOPs per weight a token runs; the head twice
    per_token = 2 * 3 * 2 * (attention + 8 * ONE_EXPERT) + 4 * 151936 * 2048
    assert flops == pytest.approx(per_token * tokens)
    assert train_flops(MOE, tokens, context=0, rank=16, checkpointing=False) < flops
    fold = train_flops(replace(MOE, fold="peft"), tokens, context=0, rank=16) - flops
    # B @ A over every expert in 2 forwards, its 2 gradients, and the expert weight gradient for the routed tokens
    assert fold == pytest.approx(2 * (2 * 16 * 128 * ONE_EXPERT * 4 + 2 * 8 * ONE_EXPERT * tokens))


def test_each_batch_decodes_until_its_longest_answer_and_ranks_split_the_records():
    one = eval_cost(MOE, UNIT, prompts=[100, 100], answers=[3, 10], batch=2, world=1, budget=50, rank=16)
    assert one.batches == 1 and one.decode_steps == 11  # the longest answer and its end-of-turn token
    assert one.worst_s > one.expected_s
    prompts, answers = [200] * 64, [5] * 32 + [60] * 32
    alone = eval_cost(MOE, UNIT, prompts, answers, batch=8, world=1, budget=80, rank=16)
    four = eval_cost(MOE, UNIT, prompts, answers, batch=8, world=4, budget=80, rank=16)
    assert alone.batches == 8 and four.batches == 2 and four.expected_s == pytest.approx(alone.expected_s / 4)
    # answers of like length share batches (the evaluator's order): 4 long and 4 short batches, not 8 long
    assert alone.decode_steps == 4 * 61 + 4 * 6
    # a bigger batch: fewer steps that each read about the same weights
    assert eval_cost(MOE, UNIT, prompts, answers, batch=32, world=1, budget=80, rank=16).expected_s \
        < alone.expected_s


@pytest.mark.parametrize("steps, every, expected", [(1849, 400, 5), (800, 400, 2), (399, 400, 1), (0, 400, 0)])
def test_evaluations_scheduled_and_at_the_end(steps, every, expected):
    assert evaluations(steps, every) == expected


def test_time_plan_adds_up_and_names_its_device():
    t = time_plan(MOE, UNIT, step_tokens=6 * 1536, micro_tokens=1536, steps=100, eval_steps=40, context=100, rank=16,
                  checkpointing=True, prompts=[300] * 8, answers=[20] * 8, gen_batch=8, world=1, budget=40,
                  loss_examples=8, loss_batch=4, loss_tokens=320)
    assert t.training_s == pytest.approx(100 * t.step_s) and t.evaluations == 3
    assert t.eval_total_s == pytest.approx(3 * (t.eval.expected_s + t.eval.loss_s)) and t.eval.loss_s > 0
    assert t.eval_share == pytest.approx(t.eval_total_s / t.training_s)
    assert t.report()["evaluations"] == 3 and "3 evaluations" in t.describe()[1]
    assert gpu_rates("NVIDIA H200") is GPUS["H200"] and gpu_rates(None) is GPUS["H100"]
    assert "not in finetune.timing.GPUS" in gpu_rates("Some GPU").name


def test_production_preset_keeps_evaluation_under_a_tenth_of_training(tmp_path):
    """The user's command with the full-scale synthetic mix (26K positives, 96K negatives after sampling) on
    Qwen3's tokenizer: the plan's generation batch (auto) fits, and evaluating costs <= 10% of training."""
    from bench.padding import full_scale_mix

    data = tmp_path / "data"
    data.mkdir()
    full_scale_mix(data)
    result = offline_dry_run(tmp_path, "--mode", "single", "--preset", "qwen3-30b-a3b", "--dry-run", "--nproc", "4",
                             f"train_file={data / 'hawks_train_curriculum.json'}",
                             f"eval_file={data / 'hawks_val_mixed.json'}")
    report = report_of(result)
    time, memory = report["time"]["single"], report["memory"]
    assert memory["fits"] and memory["gen_eval_batch_size_auto"] and memory["gen_eval_batch_size"] == 64
    assert time["gen_eval_records"] == 256 and time["evaluations"] >= 4
    assert 0 < time["eval_share"] <= 0.10, time
    assert time["device"] == "H100 80GB" and time["optimizer_steps"] > 1000
    assert "time single " in result.stdout and "of training per device" in result.stdout
    # every figure from real tokens (Qwen3's carried tokenizer), none an upper bound
    assert report["token_lengths"] is True and report["tokenizer"] == "carried"
    assert isinstance(report["gen_eval_answer_tokens"], int) and 0 < report["gen_eval_answer_tokens"] < 300
    assert "skipped" not in result.stdout and "not measured" not in result.stdout
    lengths = report["data"]["single"]
    assert lengths["examples"] == 174_663 and lengths["over_max_length"] == 0 and lengths["tokens"]["p100"] < 1536
    assert 4 < lengths["examples_per_row"] < 8 and "examples per packed row" in result.stdout
    # the preset's accumulation keeps an optimizer step near the Axolotl plan's 64 examples
    assert 55 < time["examples_per_step"] < 80
    # (a preset evaluating every 200 steps fails this: tests/mutations/run.py preset-evaluates-every-200-steps)


def test_probe_runs_each_backend_in_its_own_process(tmp_path):
    """bench/probe.py, as the GPU checks run it, on a narrow MoE on this CPU: one child process per backend
    (Unsloth patches transformers, TRL and PEFT for the whole process), each timing a training step, a
    prefill and decode steps, and the parent collecting every row."""
    import os
    import subprocess
    import sys

    from tests.test_preflight import REPO

    narrow = "hidden_size=256,num_experts=8,moe_intermediate_size=128,num_attention_heads=4,num_key_value_heads=2," \
             "head_dim=64"
    result = subprocess.run([sys.executable, "-m", "bench.probe", "--layers", "1", "--backends", "unsloth,hf",
                             "--narrow", narrow, "--max-length", "256", "--gen-batch", "2", "--new-tokens", "2",
                             "--no-record"], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "QWEN_FINETUNE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 layers")]
    assert "failed" not in result.stdout, result.stdout[-3000:]
    for backend in ("unsloth", "hf"):
        mine = sorted({row.strip() for row in rows if row.startswith(f"| 1 layers, {backend}, bf16")})
        assert len(mine) == 3, rows  # training step, prefill, decode step
        for row in mine:
            predicted, measured = (float(cell.split()[0]) for cell in row.split("|")[3:5])
            # a narrow model's decode step is a few ms, inside the timing noise (it can come out negative):
            # only the training step is long enough to be sure of
            assert predicted > 0 and math.isfinite(measured) and (measured > 0 or "training step" not in row), row
