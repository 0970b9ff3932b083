"""Packing (`packing=true`): several examples per padding-free row, the same loss as one at a time.

The finished rows are also checked against TRL's own preparation of the same records: the trainer skips
TRL's dataset step, so the tokens it trains on must be the ones TRL would have made.
"""

import pytest

from packing_check import run_variants

VARIANTS = [("hf", "tiny-moe", "auto"), ("unsloth", "tiny-moe", "auto"), ("hf", "tiny-dense", "auto"),
            ("unsloth", "tiny-dense", "auto"), ("unsloth", "tiny-moe", "sdpa")]


@pytest.fixture(scope="module")
def packing_check():
    """The check of one variant; every variant of a backend computed in one process, on first use."""
    found = {}

    def check(backend, model, attention):
        if backend not in found:
            mine = [(m, a) for b, m, a in VARIANTS if b == backend]
            found[backend] = dict(zip(mine, run_variants(backend, mine)))
        return found[backend][(model, attention)]

    return check


@pytest.mark.parametrize("backend,model,attention", VARIANTS)
def test_a_packed_batch_is_the_same_computation_as_its_examples_alone(packing_check, backend, model, attention):
    r = packing_check(backend, model, attention)
    assert r["backend"] == backend and r["model"] == model
    assert r["packed_report"]["rows"] < r["plain_report"]["rows"] == 16  # it did pack
    assert r["model_attention"] == r["attention"] and not r["has_attention_mask"]
    if attention == "auto":
        # on a CPU, auto attends each packed example on its own (sdpa_varlen), so TRL's padding-free collator
        # flattens the micro-batch into one sequence, as with FlashAttention
        assert r["attention"] == "sdpa_varlen"
        assert r["collator"] == "DataCollatorForLanguageModeling" and r["rows_in_first_batch"] == 1
    else:
        # with sdpa's block-diagonal mask the rows stay side by side; positions restart per example
        assert r["collator"] == "PackedRowsCollator" and r["rows_in_first_batch"] == 2
    assert r["examples_in_first_batch"] >= 4
    # every trained token's loss inside the trainer's packed batch equals its loss with the example alone, and
    # so does the same batch flattened into one padding-free sequence (the FlashAttention layout) ...
    assert r["trained_tokens_checked"] > 100 and r["max_token_loss_diff"] < 1e-4
    assert r["max_token_loss_diff_flattened"] < 1e-4
    # ... which a row without restarted positions does not give (the check can fail)
    assert r["control_diff_without_restart"] > 0.1
    # one optimizer step over the same examples: the same gradient, packed or padded
    assert r["same_tensors"] and r["gradient_tensors"] > 0 and r["max_relative_gradient_diff"] < 1e-5
    assert r["packed_batches"] < r["plain_batches"]
    # no library says it turned packing off (Unsloth's CPU fallback did, for sdpa, before the trainer set it)
    assert "turning it off" not in r["printed"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from data_tools.synth import generate
    from finetune.config import resolve
    from finetune.model import load_tokenizer

    cfg = resolve("single", "tiny", None, {"eval_file": "", "max_train_samples": "0"}, {}, None)
    records = generate(0, "train", "positive", 30) + generate(0, "train", "negative", 20)
    return cfg, load_tokenizer(cfg), records


def test_our_rows_are_the_rows_trl_would_have_prepared(tiny, tmp_path):
    """The trainer's rows against TRL's own dataset preparation of the same prompt/completion pairs (with the
    loss then ended at <|im_end|>), including examples cut at max_length and one cut before its answer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from core.prompt import record_prompt_completion
    from finetune import trl_cpu
    from finetune.config import resolve
    from finetune.data import labels_ending_at, stage_data
    from finetune.model import resolve_model_path

    trl_cpu.install_if_needed()
    cfg, tokenizer, records = tiny
    short = resolve("single", "tiny", None, {"eval_file": "", "max_length": "150"}, {}, None)
    ours = stage_data(short, records, [], tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), max_length=150, completion_only_loss=True, use_cpu=True,
                     report_to="none")
    trl = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model_name)), args=args,
                     processing_class=tokenizer,
                     train_dataset=Dataset.from_list([record_prompt_completion(r) for r in records]))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    theirs = [(row["input_ids"], labels_ending_at(row["labels"], end)) for row in trl.train_dataset]
    mine = [(row["input_ids"], row["labels"]) for row in ours.train]
    assert mine == theirs
    cut = [ids for ids, _ in mine if len(ids) == 150]
    assert cut and 0 < ours.dropped == len(records) - len(mine)  # some cut, the answerless ones counted
    assert ours.report()["tokens"] == sum(len(ids) for ids, _ in mine)  # the kept rows' tokens only


def test_the_loss_falls_on_the_answer_and_its_end_of_turn(tiny):
    """The prompt is masked and `<|im_end|>` stays in the loss, so the model learns to stop; the template's
    newline after it is not trained (Axolotl does not train it either)."""
    from core.prompt import record_messages
    from finetune.data import stage_data

    cfg, tokenizer, records = tiny
    data = stage_data(cfg, records, [], tokenizer)
    assert data.dropped == 0 and len(data.train) == len(records)
    for record, row in zip(records, data.train, strict=True):
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert tokenizer.decode(trained) == record["output"] + "<|im_end|>"
        full = tokenizer.apply_chat_template(record_messages(record), tokenize=True, return_dict=False)
        assert row["input_ids"] == full  # the model's own template, nothing added


def test_packed_rows_hold_every_example_once_within_max_length(tiny):
    from finetune.config import resolve
    from finetune.data import describe_packing, stage_data

    cfg, tokenizer, records = tiny
    plain = stage_data(cfg, records, [], tokenizer)
    packed = stage_data(resolve("single", "tiny", None, {"eval_file": "", "packing": "true"}, {}, None),
                        records, [], tokenizer)
    pieces = []
    for row in packed.train:
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) <= cfg.max_length
        at = 0
        for n in row["seq_lengths"]:
            pieces.append((row["input_ids"][at:at + n], row["labels"][at:at + n]))
            at += n
    assert sorted(pieces) == sorted((r["input_ids"], r["labels"]) for r in plain.train)
    report = packed.report()
    assert report["examples"] == len(records) and report["rows"] == len(packed.train) < len(records) / 2
    assert report["tokens"] == plain.report()["tokens"] and report["row_fill"] > 0.8
    assert describe_packing(report).startswith(f"packing: {len(records)} examples in {report['rows']} ")
    assert describe_packing(plain.report()).startswith("packing off")
    from core.redact import redact

    assert redact(report) == report  # logged to MLflow as is: no key reads as a secret


def test_side_by_side_rows_restart_positions_and_never_train_across_a_boundary():
    """The sdpa/eager collator: rows padded to the longest, positions restarting at each example, no
    attention mask, and an example's first token never a target (rehearsal text trains every token)."""
    from finetune.collate import PackedRowsCollator

    text = {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [2, 3]}  # two documents
    task = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "seq_lengths": [3]}
    batch = PackedRowsCollator(pad_token_id=0)([text, task])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9], [-100, 6, 7, -100, -100]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
