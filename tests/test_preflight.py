"""`--dry-run` offline: the production preset's report with no hub, no cache and no data (the memory plan
itself: tests/test_memory.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import ConfigError, resolve

REPO = Path(__file__).resolve().parent.parent
ZERO2 = str(REPO / "deepspeed_configs" / "zero2.json")
PRESET = ("--preset", "qwen3-30b-a3b", "--dry-run")
# what a library warning looks like in a command's output: logging's and torch's prefixes, the warnings module
LIBRARY_NOISE = re.compile(r"(?im)^(W\d{4} |\[[\w.]+\|WARNING\]|.*\[WARNING\]|.*Warning: |Failed to load )|deprecat")


def offline_dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with no hub (HF_HUB_OFFLINE) and an empty Hugging Face cache, in a folder
    without the production data. The timeout only guards a hang: the old hub retries took ~30 s."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "QWEN_FINETUNE_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(REPO / "qwen_finetune.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def report_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_production_preset_dry_run_works_offline(tmp_path):
    runs, outputs = {}, {}
    for name, args in {"auto_x4": ("--mode", "single", "--nproc", "4"),  # the user's command: no DeepSpeed flag
                       "zero2_x1": ("--mode", "single", "--deepspeed", ZERO2, "--nproc", "1"),
                       "two_stage_x4": ("--mode", "two-stage", "--nnodes", "2", "--nproc", "2")}.items():
        result = offline_dry_run(tmp_path, *PRESET, *args)
        runs[name] = report_of(result)
        out = result.stdout
        assert ("model config: finetune/model_configs/Qwen3-30B-A3B-Instruct-2507.json (shipped copy"
                in out)
        # no tokenizer in the cache, no hub: Qwen3's own, carried in the repository
        assert "tokenizer    Qwen3's own, carried in qwen3_tokenizer/" in out and "skipped" not in out
        assert "data missing eval_file: file not found: data/train/hawks_val_mixed.json" in out
        assert "memory       training " in out and f"world size {runs[name]['world_size']}" in out
        # the production preset packs; on the Unsloth backend the MoE's experts run Unsloth's own kernels
        assert "packing      on: several examples per padding-free row of up to 1536 tokens" in out
        assert "experts      unsloth on a GPU (experts_implementation=auto, backend unsloth)" in out
        assert runs[name]["packing"] is True and runs[name]["experts_implementation"] == "unsloth"
        # attention as chosen on this machine: no GPU, so packed examples are attended one by one by sdpa
        assert "rows flattened into one sequence" in out and runs[name]["attn_implementation"] == "sdpa_varlen"
        assert "attention    sdpa_varlen on this machine (attn_implementation=auto)" in out
        outputs[name] = out
        # the first screen is ours: no library warning anywhere (core/quiet.py hides the known harmless ones)
        noise = LIBRARY_NOISE.search(result.stdout + result.stderr)
        assert noise is None, noise
    # the README shows these lines of the same reports: they are what the command prints today
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    shown = [line for line in readme if line.startswith(("memory       training", "loading      the MoE experts"))]
    assert len(shown) == 3
    assert shown[0] in outputs["auto_x4"].splitlines(), shown[0]
    assert all(line in outputs["two_stage_x4"].splitlines() for line in shown[1:]), shown[1:]
    for report in runs.values():
        assert report["base_parameters"] == pytest.approx(30.5e9, rel=0.01)
        assert report["model_config_shipped"] == "finetune/model_configs/Qwen3-30B-A3B-Instruct-2507.json"
        assert report["token_lengths"] is True and report["tokenizer"] == "carried"
        assert report["memory"]["gen_eval_gib"]["kv_cache"] > 0
    zero2, one, two = runs["auto_x4"], runs["zero2_x1"], runs["two_stage_x4"]
    # deepspeed=auto on 4 GPUs: ZeRO-2 with the optimizer on the GPU (it fits; no CPU Adam to compile)
    assert zero2["world_size"] == 4 and zero2["zero_stage"] == 2 and zero2["optimizer_offload"] is False
    assert one["world_size"] == 1 and one["optimizer_offload"] is True
    assert two["world_size"] == 4 and two["zero_stage"] == 0 and two["optimizer_offload"] is False
    # two nodes of two ranks each: the same four devices, planned alike
    assert two["nodes"] == 2 and zero2["nodes"] == 1
    assert "mode         two-stage, world size 4 (2 nodes x 2 ranks)" in outputs["two_stage_x4"]
    # the optimizer shard on the GPU (4 ranks) against the one offloaded to the CPU (zero2.json)
    mem4, mem1 = zero2["memory"], one["memory"]
    assert mem4["training_gib"]["optimizer"] > 0 and mem1["training_gib"]["optimizer"] == 0
    assert mem4["training_peak_gib"] > mem1["training_peak_gib"]
    assert two["memory"]["launcher"] == "DDP" and two["memory"]["training_gib"]["optimizer"] > 0
    assert any("train_file: file not found" in m for m in zero2["missing_data"])


def test_dry_run_measures_the_examples_it_has_with_qwen3s_carried_tokenizer(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    record = {"instruction": "抽出", "input": "記事", "output": json.dumps({"offenders": []})}
    (tmp_path / "data" / "train" / "hawks_train.json").write_text(json.dumps([record] * 3), encoding="utf-8")
    result = offline_dry_run(tmp_path, *PRESET, "--mode", "two-stage")
    report = report_of(result)
    # counted by hand on Qwen3's vocabulary, Instruct-2507's rendering (no thinking block): <|im_start|>
    # system \n 抽出 <|im_end|> \n, the same for user and 記事, <|im_start|> assistant \n, then {" off enders
    # ": ' []' } <|im_end|> \n: 6 + 6 + 3 + 6 + 2 = 23 tokens
    assert report["data"]["stage1"]["examples"] == 3 and report["data"]["stage1"]["tokens"]["p100"] == 23
    assert report["tokenizer"] == "carried" and report["world_size"] == 1
    assert "data stage1  3 examples; tokens" in result.stdout
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
