"""The shipped tiny models: what tiny/build.py records, loading like hub models, a tokenizer a model can copy names with."""

import hashlib
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.prompt import record_messages
from data_tools import synth
from data_tools.synth import generate
from tiny import BUILD_RECORD, HOME, model_dir
from tiny.build import SHIPPED_FILES, Article, TinySpec, file_hashes, people_facts, recipe_hash


def test_shipped_files_are_the_recorded_build_of_this_recipe():
    record = json.loads(BUILD_RECORD.read_text())
    # The recipe (spec + builder + generator + prompt builder) is the one the shipped weights came from:
    # change any of them and this fails until `python -m tiny.build` has rebuilt the models.
    assert record["recipe_sha256"] == recipe_hash(TinySpec()), "rebuild: python -m tiny.build"
    assert record["spec"] == json.loads(json.dumps(TinySpec().__dict__))
    # ... and the files are the ones that build wrote, byte for byte.
    assert set(record["files_sha256"]) == {f"{m}/{f}" for m in ("dense", "moe") for f in SHIPPED_FILES}
    assert file_hashes(HOME) == record["files_sha256"]
    size = sum((HOME / k).stat().st_size for k in record["files_sha256"])
    assert size < 25e6


def test_file_hashes_notice_a_changed_byte(tmp_path):
    for sub in ("dense", "moe"):
        (tmp_path / sub).mkdir()
        for name in SHIPPED_FILES:
            (tmp_path / sub / name).write_bytes(b"x")
    before = file_hashes(tmp_path)
    (tmp_path / "moe" / "model.safetensors").write_bytes(b"y")
    after = file_hashes(tmp_path)
    assert [k for k in before if before[k] != after[k]] == ["moe/model.safetensors"]
    assert after["moe/model.safetensors"] == hashlib.sha256(b"y").hexdigest()


def test_people_facts_give_only_what_the_article_says():
    rng = random.Random("0:pretrain:positive:5")
    a = synth.Article(rng, held_out_names=False)
    text, offenders = synth.pos_domestic(a)
    facts = people_facts(Article(text, sorted(a.people, key=lambda p: text.find(p.name))))
    spouse, offender = facts  # the wife is named first
    assert spouse["occupation"] is None and spouse["address"] is None  # the article gives neither
    assert offender == {k: offenders[0][k] for k in ("name", "age", "occupation", "address")}


def test_tokenizer_is_qwen3_like_and_names_are_the_same_tokens_in_context():
    tok = AutoTokenizer.from_pretrained(model_dir("tiny-dense"))
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
    # Held-out names (never seen by the tokenizer's training) are the same tokens inside the article as
    # on their own, so the answer's tokens occur in the context and a model can copy them.
    copyable = total = tokens = 0
    for r in generate(0, "val", "positive", 200, held_out_names=True):
        ids = tok(r["input"])["input_ids"]
        assert tok.decode(ids) == r["input"]
        for offender in json.loads(r["output"])["offenders"]:
            name = tok(offender["name"])["input_ids"]
            total += 1
            copyable += any(ids[i:i + len(name)] == name for i in range(len(ids)))
            tokens += len(name)
    assert copyable / total >= 0.98, (copyable, total)
    assert tokens / total < 3.5  # names stay short: surname and given-name pieces


def test_dense_and_moe_models_load_and_run():
    dense = AutoModelForCausalLM.from_pretrained(model_dir("tiny-dense"))
    moe = AutoModelForCausalLM.from_pretrained(model_dir("tiny-moe"))
    assert type(dense).__name__ == "Qwen3ForCausalLM" and type(moe).__name__ == "Qwen3MoeForCausalLM"
    params = dict(moe.named_parameters())
    experts = params["model.layers.0.mlp.experts.gate_up_proj"]
    assert experts.dim() == 3 and experts.shape[0] == moe.config.num_experts  # fused experts
    assert "model.layers.0.mlp.gate.weight" in params  # the router
    tok = AutoTokenizer.from_pretrained(model_dir("tiny-dense"))
    batch = tok(["警視庁は逮捕した。"], return_tensors="pt")
    for model in (dense, moe):
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 3 or tok.eos_token_id in out[0].tolist()


def test_stats_token_lengths_use_the_chat_template(cli, tmp_path):
    records = generate(0, "train", "positive", 5)
    (tmp_path / "t.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    r = cli("-m", "data_tools", "stats", str(tmp_path / "t.json"), "--tokenizer", str(model_dir("tiny-dense")))
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(model_dir("tiny-dense"))
    # Independent of the code under test: render the chat as text, then tokenise it.
    longest = max(len(tok(tok.apply_chat_template(record_messages(x), tokenize=False),
                          add_special_tokens=False)["input_ids"]) for x in records)
    assert f"'p100': {longest}" in r.stdout and longest > 50


def test_a_missing_tiny_model_is_one_clear_error(tmp_path):
    from core.records import DataError

    with pytest.raises(DataError, match="moe has no config.json: the shipped tiny model is missing.*tiny.build"):
        model_dir("tiny-moe", home=tmp_path)
    assert model_dir("tiny-moe") == HOME / "moe"
