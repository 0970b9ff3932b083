"""The tiny offline models load through the same from_pretrained path as hub models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_tools.prompt import record_messages
from data_tools.synth import generate
from data_tools.tiny_model import ensure_tiny_models


@pytest.fixture(scope="module")
def tiny():
    return ensure_tiny_models()


def test_tokenizer_is_qwen3_like(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.dense)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    record = generate(0, "val", "positive", 1, held_out_names=True)[0]
    text = tok.apply_chat_template(record_messages(record), tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith(record["output"] + "<|im_end|>\n")
    prompt = tok.apply_chat_template(record_messages(record, with_answer=False), tokenize=False,
                                     add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(record["input"])["input_ids"]
    assert tok.decode(ids) == record["input"]
    name = json.loads(record["output"])["offenders"][0]["name"]
    assert len(tok(name, add_special_tokens=False)["input_ids"]) == len(name)  # one token per kanji


def test_dense_and_moe_models_load_and_run(tiny):
    dense = AutoModelForCausalLM.from_pretrained(tiny.dense)
    moe = AutoModelForCausalLM.from_pretrained(tiny.moe)
    assert type(dense).__name__ == "Qwen3ForCausalLM" and type(moe).__name__ == "Qwen3MoeForCausalLM"
    params = dict(moe.named_parameters())
    experts = params["model.layers.0.mlp.experts.gate_up_proj"]
    assert experts.dim() == 3 and experts.shape[0] == moe.config.num_experts  # fused experts
    assert "model.layers.0.mlp.gate.weight" in params  # the router
    tok = AutoTokenizer.from_pretrained(tiny.dense)
    batch = tok(["警視庁は逮捕した。"], return_tensors="pt")
    for model in (dense, moe):
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 3 or tok.eos_token_id in out[0].tolist()


def test_stats_token_lengths_use_the_chat_template(tiny, cli, tmp_path):
    records = generate(0, "train", "positive", 5)
    (tmp_path / "t.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    r = cli("-m", "data_tools", "stats", str(tmp_path / "t.json"), "--tokenizer", str(tiny.dense))
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(tiny.dense)
    # Independent of the code under test: render the chat as text, then tokenise it.
    longest = max(len(tok(tok.apply_chat_template(record_messages(x), tokenize=False),
                          add_special_tokens=False)["input_ids"]) for x in records)
    assert f"'p100': {longest}" in r.stdout and longest > 100


def test_build_is_cached(tiny, capsys):
    assert ensure_tiny_models() == tiny
    assert (tiny.dense.parent / "build.json").exists()
    assert "building" not in capsys.readouterr().out
