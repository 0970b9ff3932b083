"""Token-length figures on Qwen3's own tokenizer (carried in qwen3_tokenizer/): what max_length cuts and
where, how many examples a packed row holds, and `data_tools stats --tokenizer qwen3` on every record."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core import qwen3_tokenizer
from core.chat_template import prompt_lengths
from data_tools.stats import examples_per_row, length_report, load_tokenizer, token_lengths

REPO = Path(__file__).resolve().parent.parent
RECORD = {"instruction": "記事から加害者を抽出してください。", "input": "東京都内で男が逮捕された。" * 20,
          "output": json.dumps({"offenders": [{"name": "山田太郎"}]}, ensure_ascii=False)}


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


def test_best_fit_packing_counts_examples_per_row():
    assert examples_per_row([100] * 10, 1000) == 10.0
    assert examples_per_row([600] * 3, 1000) == 1.0
    assert examples_per_row([700, 300, 700, 300], 1000) == 2.0  # best fit pairs them
    assert examples_per_row([5000, 100], 1000) == 1.0  # an over-long example is cut to a row of its own
    assert examples_per_row([], 1000) == 0.0


def test_max_length_cuts_the_answer_or_drops_the_example(qwen3):
    full = token_lengths([RECORD], qwen3)[0]
    prompt = prompt_lengths([RECORD], qwen3)[0]
    assert 0 < prompt < full
    fits = length_report([RECORD] * 4, qwen3, max_length=full)
    assert fits["over_max_length"] == 0 and fits["over_share"] == 0 and fits["examples_per_row"] == 1.0
    answer = length_report([RECORD] * 4, qwen3, max_length=full - 1)  # the end of the answer is cut
    assert (answer["over_max_length"], answer["answer_cut"], answer["prompt_over"]) == (4, 4, 0)
    assert answer["over_share"] == 1.0
    dropped = length_report([RECORD] * 4, qwen3, max_length=prompt)  # no answer token left: dropped
    assert (dropped["answer_cut"], dropped["prompt_over"]) == (0, 4)
    short = length_report([RECORD] * 6, qwen3, max_length=3 * full)
    assert short["examples_per_row"] == 3.0 and short["tokens"]["p100"] == full and short["tokens_mean"] == full


def test_stats_reports_the_packing_figures_with_the_carried_tokenizer(tmp_path, qwen3):
    data = tmp_path / "t.json"
    data.write_text(json.dumps([RECORD] * 5, ensure_ascii=False), encoding="utf-8")
    full = token_lengths([RECORD], qwen3)[0]
    result = subprocess.run([sys.executable, "-m", "data_tools", "stats", str(data), "--tokenizer", "qwen3",
                             "--max-length", str(2 * full)], cwd=REPO, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                 "QWEN_FINETUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert f"'p100': {full}" in out and "examples_per_packed_row 1.67" in out  # 5 examples in rows of 2, 2, 1
    assert f"{f'over {2 * full} tokens':22} 0 (0.0%)" in out and "packed_rows_per_epoch  ~3 " in out
    # unpacked into the test's own cache folder, checksum-checked
    assert (tmp_path / "cache").is_dir() and qwen3_tokenizer.folder().is_dir()


def test_carried_tokenizer_renders_instruct_2507s_template_without_a_thinking_block(qwen3):
    """One record through the carried tokenizer's template, against the rendering written out by hand:
    Instruct-2507's (no <think> block, unlike the hybrid Qwen3 template in the upstream tokenizer_config)."""
    record = {"instruction": "抽出して", "input": "記事本文", "output": '{"offenders": []}'}
    from core.prompt import record_messages

    expected = ("<|im_start|>system\n抽出して<|im_end|>\n<|im_start|>user\n記事本文<|im_end|>\n"
                '<|im_start|>assistant\n{"offenders": []}<|im_end|>\n')
    assert qwen3.apply_chat_template(record_messages(record), tokenize=False) == expected
    prompt = qwen3.apply_chat_template(record_messages(record, with_answer=False), tokenize=False,
                                       add_generation_prompt=True)
    assert prompt == expected[:expected.index('{"offenders"')] and "<think>" not in prompt
    assert qwen3.convert_tokens_to_ids("<|im_end|>") == 151645 and len(qwen3) == 151_669


def test_stats_offline_uses_the_carried_tokenizer_for_a_qwen3_hub_id_and_names_a_missing_one(tmp_path):
    data = tmp_path / "t.json"
    data.write_text(json.dumps([RECORD], ensure_ascii=False), encoding="utf-8")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "QWEN_FINETUNE_CACHE": str(tmp_path / "cache")}

    def stats(tokenizer):
        return subprocess.run([sys.executable, "-m", "data_tools", "stats", str(data), "--tokenizer", tokenizer],
                              cwd=REPO, capture_output=True, text=True, env=env)

    qwen = stats("unsloth/Qwen3-30B-A3B-Instruct-2507")
    assert qwen.returncode == 0, qwen.stderr[-2000:]
    assert "tokenizer: Qwen3's own, carried in qwen3_tokenizer/ (unsloth/Qwen3-30B-A3B-Instruct-2507 is not" \
        in qwen.stderr and "examples_per_packed_row" in qwen.stdout
    missing = stats("nope/missing")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error: --tokenizer nope/missing: no tokenizer there")


def test_an_empty_file_has_no_lengths_and_no_rows(qwen3):
    assert token_lengths([], qwen3) == []
    report = length_report([], qwen3, max_length=1536)
    assert report["examples"] == 0 and report["tokens"] == {} and report["examples_per_row"] == 0.0


def test_the_runs_lengths_come_from_its_one_tokenisation_and_equal_the_stats_report(qwen3):
    """The trainer reports token lengths from the pass that builds its rows (finetune/data.py), not from a
    second tokenisation: the report equals data_tools.stats on every record, cuts and drops included."""
    from data_tools.synth import generate
    from finetune.config import resolve
    from finetune.data import stage_data, task_lengths

    records = generate(0, "train", "positive", 30) + generate(0, "train", "negative", 10)
    for max_length in (4096, 300, 150):  # nothing cut; some answers cut; some prompts over max_length too
        cfg = resolve("single", "tiny", None, {"eval_file": "", "max_length": str(max_length)}, {}, None)
        rows = stage_data(cfg, records, [], qwen3)
        assert task_lengths(rows, len(records), max_length) == length_report(records, qwen3, max_length, sample=None)
