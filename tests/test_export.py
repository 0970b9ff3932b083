"""`qwen_finetune.py export`: merged models answer like base + adapter (dense and fused-expert MoE)."""

import json

import pytest
import torch
import yaml

from test_distill import peft_model_with_trained_looking_adapter
from test_trainer import ok, train

from core.prompt import record_messages
from data_tools.synth import generate


def saved_run(tmp_path, kind: str):
    """A stage folder as the trainer leaves it: adapter/ (weights + tokenizer) and config.yaml."""
    from finetune.config import to_dict

    cfg, model, tokenizer = peft_model_with_trained_looking_adapter(kind)
    stage = tmp_path / "run" / "single"
    model.save_pretrained(stage / "adapter")
    tokenizer.save_pretrained(stage / "adapter")
    (stage / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return stage / "adapter", tokenizer


def greedy_answers(model, tokenizer, records) -> list[str]:
    answers = []
    for record in records:
        ids = tokenizer.apply_chat_template(record_messages(record, with_answer=False), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:]))
    return answers


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_merged_model_answers_like_base_plus_adapter(tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.model import resolve_model_path

    adapter, tokenizer = saved_run(tmp_path, kind)
    result = ok(train("export", "--adapter", str(adapter), "--out", "merged", "--merge", cwd=tmp_path))
    assert "wrote merged model (float32" in result.stdout

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    base_path = resolve_model_path(f"tiny-{kind}")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter))
    base = AutoModelForCausalLM.from_pretrained(base_path)
    records = generate(0, "val", "positive", 4, held_out_names=True) + generate(0, "val", "negative", 2)
    expected = greedy_answers(with_adapter, tokenizer, records)
    assert greedy_answers(merged, merged_tokenizer, records) == expected
    assert greedy_answers(base, tokenizer, records) != expected  # the adapter matters, so the merge is tested

    merged_state, base_state = merged.state_dict(), base.state_dict()
    assert set(merged_state) == set(base_state)  # plain model: no LoRA leftovers
    changed = {k for k in base_state if not torch.equal(merged_state[k], base_state[k])}
    if kind == "moe":
        assert any(".mlp.experts.gate_up_proj" in k for k in changed)
        assert any(".mlp.experts.down_proj" in k for k in changed)
        assert not any(k.endswith(".mlp.gate.weight") for k in changed)  # the router was not trained
    assert any(".self_attn.q_proj" in k for k in changed)


def test_export_refuses_to_overwrite_and_copies_an_adapter_without_merge(tmp_path):
    from peft import AutoPeftModelForCausalLM

    adapter, _ = saved_run(tmp_path, "dense")
    ok(train("export", "--adapter", str(adapter), "--out", "exported", cwd=tmp_path))
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert (tmp_path / "exported" / "tokenizer_config.json").is_file()
    assert AutoPeftModelForCausalLM.from_pretrained(tmp_path / "exported") is not None  # the base path resolves
    assert config["base_model_name_or_path"].endswith("dense")
    # a folder without a run summary (an adapter saved by hand) still gets a card, saying what it lacks
    assert "No generation metrics were recorded" in (tmp_path / "exported" / "README.md").read_text(encoding="utf-8")

    again = train("export", "--adapter", str(adapter), "--out", "exported", "--merge", cwd=tmp_path)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "exported already exists and is not empty; pass --overwrite" in again.stderr
    assert not (tmp_path / "exported" / "model.safetensors").exists()  # untouched
    ok(train("export", "--adapter", str(adapter), "--out", "exported", "--merge", "--overwrite", cwd=tmp_path))
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert not (tmp_path / "exported" / "adapter_config.json").exists()  # replaced, not mixed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported.")]  # no temp folder left


def test_export_errors_are_one_line(tmp_path):
    missing = train("export", "--adapter", "nowhere", "--out", "x", "--merge", cwd=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "nowhere: not a PEFT adapter folder" in missing.stderr
    adapter, _ = saved_run(tmp_path, "dense")
    bad_base = train("export", "--adapter", str(adapter), "--out", "x", "--merge", "--base", str(tmp_path / "nobase"),
                     cwd=tmp_path)
    assert bad_base.returncode == 1 and "Traceback" not in bad_base.stderr and "nobase" in bad_base.stderr
    assert not (tmp_path / "x").exists()


def test_adapter_from_a_4bit_run_is_merged_into_bf16_with_a_note(tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, _ = saved_run(tmp_path, "dense")
    config = yaml.safe_load((adapter.parent / "config.yaml").read_text())
    (adapter.parent / "config.yaml").write_text(yaml.safe_dump({**config, "load_in_4bit": True}))
    result = ok(train("export", "--adapter", str(adapter), "--out", "merged", "--merge", cwd=tmp_path))
    assert "merged model (bfloat16" in result.stdout and "trained on the 4-bit (NF4) base" in result.stdout
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16


def test_model_card_reports_the_exported_step(tmp_path):
    """adapter/ holds the chosen step, adapter_last/ the last: each card quotes its own step's metrics."""
    from core.metrics import HEADLINE
    from finetune.model_card import model_card

    stage = tmp_path / "run" / "stage2"
    stage.mkdir(parents=True)
    config = {"mode": "two-stage", "model_name": "Qwen/Qwen3-30B-A3B", "lora_r": 32, "load_in_4bit": True}
    (stage / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"global_step": 4, "train_losses": [[1, 2.5], [4, 0.5]], "best": {"metric": HEADLINE[2], "adapter_step": 2},
               "data": {"train_file": "data/mix.json", "train_examples": 1200, "train_sha256": "ab" * 32},
               "launch": {"nodes": 2, "ranks_per_node": 8}}
    (stage / "run_summary.json").write_text(json.dumps(summary))
    for step, value in ((2, 0.875), (4, 0.8125)):
        (stage / f"gen_metrics_step{step}.json").write_text(json.dumps({**{m: value for m in HEADLINE},
                                                                         "gen_num_examples": 16}))
    (tmp_path / "run" / "stage1").mkdir()
    (tmp_path / "run" / "stage1" / "run_summary.json").write_text(json.dumps(
        {"global_step": 9, "data": {"train_file": "data/pos.json", "train_examples": 300, "train_sha256": "cd" * 32}}))
    best = model_card(stage / "adapter", "Qwen/Qwen3-30B-A3B", merged=True, license_id="apache-2.0", config=config)
    last = model_card(stage / "adapter_last", "Qwen/Qwen3-30B-A3B", merged=False, license_id="apache-2.0",
                      config=config)
    assert f"| {HEADLINE[2]} | 0.8750 |" in best and "step 2 of 4" in best and "chosen for the highest" in best
    assert f"| {HEADLINE[2]} | 0.8125 |" in last and "step 4 of 4" in last and "chosen for the highest" not in last
    assert "| stage1 | train | `pos.json` | 300 |" in best and "| stage2 | train | `mix.json` | 1,200 |" in best
    assert "| launch | 2 node(s) x 8 rank(s) |" in best and "| training loss | 2.5000 (step 1) -> 0.5000 (step 4) |" in best
    assert yaml.safe_load(best.split("---")[1])["library_name"] == "transformers"
    assert yaml.safe_load(last.split("---")[1])["library_name"] == "peft" and "PeftModel.from_pretrained" in last
