"""How the generation eval batches: rows whose answers end together share a batch, and batching (left
padding, the MoE's routing over a padded batch) leaves every greedy answer as it is alone."""

import pytest

from callbacks.generation_eval import batch_order, gold_answer_lengths


def test_batches_group_answers_of_like_length_longest_first():
    prompts = [100, 300, 200, 150, 120, 400]
    answers = [5, 70, 5, 66, 5, 70]
    order = batch_order(prompts, answers)
    # answers of about the same length (66 and 70: one bucket of 16 tokens) longest first, longest prompts
    # first inside a bucket: in batches of 3, the three long answers together and the three "no offender"
    # ones together
    assert order == [5, 1, 3, 2, 4, 0]
    assert batch_order([100, 300], [40, 10]) == [0, 1]  # another bucket: the answer length decides
    assert batch_order([], []) == []


def test_gold_lengths_count_tokens_and_a_missing_answer_as_zero():
    from transformers import AutoTokenizer

    from finetune.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny-moe"))
    records = [{"output": '{"offenders": []}'}, {"output": ""}, {}]
    lengths = gold_answer_lengths(records, tokenizer)
    assert lengths[0] == len(tokenizer('{"offenders": []}', add_special_tokens=False)["input_ids"]) > 0
    assert lengths[1:] == [0, 0]


@pytest.mark.parametrize("model_name", ["tiny-moe"])
def test_batched_answers_equal_one_at_a_time(model_name):
    """The MoE, bare (its answers run long and differ per record): batches of 4 with left padding give
    each record exactly the answer it gets alone, in the records' order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from callbacks.generation_eval import generate_answers
    from data_tools import prepare, synth
    from finetune.model import resolve_model_path

    torch.manual_seed(0)
    path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    records = prepare.validation_mix(synth.generate(3, "val", "positive", 5, held_out_names=True),
                                     synth.generate(3, "val", "negative", 5, held_out_names=True), 0.5, seed=2)
    padding_side = tokenizer.padding_side
    batched = generate_answers(model, tokenizer, records, batch_size=4, max_new_tokens=40)
    alone = generate_answers(model, tokenizer, records, batch_size=1, max_new_tokens=40)
    assert [a["prediction"] for a in batched] == [a["prediction"] for a in alone]
    assert len({a["prediction"] for a in alone}) > 1  # not one answer for every record
    for i in (0, len(records) - 1):  # each answer is returned at its record's place
        assert generate_answers(model, tokenizer, [records[i]], max_new_tokens=40)[0] == alone[i]
    assert tokenizer.padding_side == padding_side
