"""`--dry-run` offline: the production preset's report with no hub, no cache and no data, and the
memory estimate's arithmetic (DeepSpeed sharding/offload, world size, the generation eval's KV cache)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.config import ConfigError, FinetuneConfig, resolve
from finetune.preflight import GIB, estimate_memory_gib

REPO = Path(__file__).resolve().parent.parent
ZERO2 = str(REPO / "deepspeed_configs" / "zero2.json")
PRESET = ("--preset", "qwen3-30b-a3b", "--dry-run")


def offline_dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with no hub (HF_HUB_OFFLINE) and an empty Hugging Face cache, in a folder
    without the production data. The timeout only guards a hang: the old hub retries took ~30 s."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, str(REPO / "qwen_finetune.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def report_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_production_preset_dry_run_works_offline(tmp_path):
    runs, outputs = {}, {}
    for name, args in {"zero2_x4": ("--mode", "single", "--deepspeed", ZERO2, "--nproc", "4"),
                       "zero2_x1": ("--mode", "single", "--deepspeed", ZERO2, "--nproc", "1"),
                       "two_stage_x4": ("--mode", "two-stage", "--nproc", "4")}.items():
        result = offline_dry_run(tmp_path, *PRESET, *args)
        runs[name] = report_of(result)
        out = result.stdout
        assert ("model config: finetune/model_configs/Qwen3-30B-A3B-Instruct-2507.json (shipped copy"
                in out)
        assert ("data         token lengths skipped: the tokenizer of unsloth/Qwen3-30B-A3B-Instruct-2507 "
                "is not available offline") in out
        assert "data missing eval_file: file not found: data/train/hawks_val_mixed.json" in out
        assert "memory/dev   ~" in out and f"world size {runs[name]['world_size']}" in out
        # the production preset packs; on the Unsloth backend the MoE's experts run Unsloth's own kernels
        assert "packing      on: several examples per padding-free row of up to 1536 tokens" in out
        assert "experts      unsloth on a GPU (experts_implementation=auto, backend unsloth)" in out
        assert runs[name]["packing"] is True and runs[name]["experts_implementation"] == "unsloth"
        # attention as chosen on this machine: no GPU, so packed examples are attended one by one by sdpa
        assert "rows flattened into one sequence" in out and runs[name]["attn_implementation"] == "sdpa_varlen"
        assert "attention    sdpa_varlen on this machine (attn_implementation=auto)" in out
        outputs[name] = out
    # the README shows these lines of the same two reports: they are what the command prints today
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    shown = [line for line in readme if line.startswith(("memory/dev   ~", "loading      the MoE experts"))]
    assert len(shown) == 3
    assert shown[0] in outputs["zero2_x4"].splitlines(), shown[0]
    assert all(line in outputs["two_stage_x4"].splitlines() for line in shown[1:]), shown[1:]
    for report in runs.values():
        assert report["base_parameters"] == pytest.approx(30.5e9, rel=0.01)
        assert report["model_config_shipped"] == "finetune/model_configs/Qwen3-30B-A3B-Instruct-2507.json"
        assert report["token_lengths"] is False and report["memory_estimate_gib_per_device"]["kv_cache_gen_eval"] > 0
    zero2, one, two = runs["zero2_x4"], runs["zero2_x1"], runs["two_stage_x4"]
    assert zero2["world_size"] == 4 and zero2["zero_stage"] == 2 and zero2["optimizer_offload"] is True
    assert one["world_size"] == 1 and one["optimizer_offload"] is True
    assert two["world_size"] == 4 and two["zero_stage"] == 0 and two["optimizer_offload"] is False
    # ZeRO-2 shards the LoRA gradients over the ranks: less per device with 4 ranks than with 1
    mem4, mem1 = zero2["memory_estimate_gib_per_device"], one["memory_estimate_gib_per_device"]
    assert mem4["lora_params_grads_optimizer"] < mem1["lora_params_grads_optimizer"]
    assert mem4["total"] < mem1["total"]
    assert any("train_file: file not found" in m for m in zero2["missing_data"])


def test_dry_run_counts_the_examples_it_has_without_a_tokenizer(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    record = {"instruction": "抽出", "input": "記事", "output": json.dumps({"offenders": []})}
    (tmp_path / "data" / "train" / "hawks_train.json").write_text(json.dumps([record] * 3), encoding="utf-8")
    result = offline_dry_run(tmp_path, *PRESET, "--mode", "two-stage")
    report = report_of(result)
    assert report["data"] == {"stage1": {"examples": 3}} and report["world_size"] == 1
    assert "data stage1  3 examples\n" in result.stdout
    assert "data missing stage2_train_file: file not found: data/train/hawks_train_curriculum.json" \
        in result.stdout


def test_unknown_model_offline_is_one_error_line(tmp_path):
    result = offline_dry_run(tmp_path, *PRESET, "model_name=nobody/no-such-model")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no config for nobody/no-such-model")
    assert "hub is unreachable" in errors[0]


def test_only_the_dry_run_tolerates_missing_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="train_file: file not found"):
        resolve("single", "qwen3-30b-a3b", None, {}, {}, None)
    assert resolve("single", "qwen3-30b-a3b", None, {}, {}, None, dry_run=True).preset == "qwen3-30b-a3b"


def test_nproc_needs_dry_run(capsys):
    from finetune.cli import main

    assert main(["--nproc", "4"], "qwen_finetune.py", "") == 1
    assert "--nproc N (N >= 1) goes with --dry-run only" in capsys.readouterr().err


def test_shipped_config_mapping_is_shared_with_the_axolotl_check():
    from finetune.model import MODEL_CONFIGS, shipped_model_config
    from parity_tools.axolotl_check import model_config_file

    shipped = MODEL_CONFIGS / "Qwen3-30B-A3B-Instruct-2507.json"
    assert shipped_model_config("unsloth/Qwen3-30B-A3B-Instruct-2507") == shipped
    assert model_config_file({"base_model": "Qwen/Qwen3-30B-A3B-Instruct-2507"}, None) == shipped
    assert shipped_model_config("nobody/no-such-model") is None and shipped_model_config("") is None


# --- estimate_memory_gib on round numbers -------------------------------------------------------------

TEXT = SimpleNamespace(hidden_size=4096, num_hidden_layers=32, vocab_size=1000, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128)
MODEL_CONFIG = SimpleNamespace(get_text_config=lambda: TEXT)
STORAGE = {"attention": {"bfloat16": 2 * GIB}}
TRAINABLE = GIB  # so each byte per trainable parameter is 1 GiB


def memory(tmp_path, zero: dict | None, world: int) -> dict:
    deepspeed = ""
    if zero is not None:  # a DeepSpeed config with this zero_optimization section
        deepspeed = str(tmp_path / "ds.json")
        Path(deepspeed).write_text(json.dumps({"zero_optimization": zero}))
    return estimate_memory_gib(FinetuneConfig(deepspeed=deepspeed), MODEL_CONFIG, STORAGE, TRAINABLE, world)


def test_kv_cache_of_the_generation_eval(tmp_path):
    # 32 sequences x (1024 prompt + 1024 answer) tokens x 32 layers x K,V x 8 heads x 128 x 2 bytes = 8 GiB
    cfg = FinetuneConfig(dtype="bfloat16", max_length=1024, gen_eval_batch_size=32)
    assert estimate_memory_gib(cfg, MODEL_CONFIG, STORAGE, TRAINABLE, 1, 1024)["kv_cache_gen_eval"] == 8
    # answer budget not measured: bounded by max_length + the 16-token margin
    assert estimate_memory_gib(cfg, MODEL_CONFIG, STORAGE, TRAINABLE)["kv_cache_gen_eval"] == 8 * 2064 / 2048
    # no head_dim in the config: hidden_size / num_attention_heads (4096 / 32 = 128), float32 doubles it
    no_head_dim = SimpleNamespace(**{k: v for k, v in vars(TEXT).items() if k != "head_dim"})
    fp32 = FinetuneConfig(dtype="float32", max_length=1024, gen_eval_batch_size=32)
    assert estimate_memory_gib(fp32, SimpleNamespace(get_text_config=lambda: no_head_dim), STORAGE, TRAINABLE,
                               1, 1024)["kv_cache_gen_eval"] == 16
    for off in ({"gen_eval": False}, {"eval_file": ""}):
        assert "kv_cache_gen_eval" not in estimate_memory_gib(FinetuneConfig(**off), MODEL_CONFIG, STORAGE,
                                                              TRAINABLE)


@pytest.mark.parametrize("zero, world, lora_gib, weights_gib", [  # LoRA: fp32 weights + grads + 2 moments
    (None, 4, 4 + 4 + 8, 2),                                              # DDP: all of it on every rank
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, 4, 4 + 1, 2),  # grads / 4, moments on the CPU
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, 1, 4 + 4, 2),
    ({"stage": 2}, 4, 4 + 1 + 2, 2),                                      # grads and moments / 4
    ({"stage": 1}, 4, 4 + 4 + 2, 2),                                      # moments / 4 only
    ({"stage": 3}, 4, 1 + 1 + 2, 0.5),                                    # the weights / 4 too
])
def test_lora_state_follows_the_deepspeed_config_and_world_size(tmp_path, zero, world, lora_gib, weights_gib):
    parts = memory(tmp_path, zero, world)
    assert parts["lora_params_grads_optimizer"] == lora_gib and parts["weights"] == weights_gib
