"""`sdpa_varlen` (finetune/attention.py): each packed example attended on its own gives the numbers of sdpa
with the block-diagonal mask transformers builds, forward and backward, and leaves generation unchanged."""

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from finetune.attention import example_lengths, register, sdpa_varlen_forward, varlen_mask


class Heads(torch.nn.Module):
    """What the attention functions read from a transformers attention module."""
    is_causal = True
    num_key_value_groups = 2


def block_causal_reference(query, key, value, position_ids):
    """Plain sdpa with an explicit mask: causal, and only inside the example a token belongs to."""
    batch, heads, length, _ = query.shape
    example = torch.cumsum(position_ids.expand(batch, -1) == 0, dim=1)  # example index of each token
    same = example[:, :, None] == example[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
    out = scaled_dot_product_attention(query, key, value, attn_mask=(same & causal)[:, None])
    return out.transpose(1, 2)


def packed_inputs(position_ids, requires_grad=True):
    torch.manual_seed(0)
    batch, length = position_ids.shape
    query = torch.randn(batch, 4, length, 16, dtype=torch.float64, requires_grad=requires_grad)
    key = torch.randn(batch, 2, length, 16, dtype=torch.float64, requires_grad=requires_grad)
    value = torch.randn(batch, 2, length, 16, dtype=torch.float64, requires_grad=requires_grad)
    return query, key, value


def test_example_lengths_split_at_each_restart_and_at_each_row():
    assert example_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]]), 1, 6) == [3, 2, 1]
    # padding (position 0) is an example of one token; a row that does not start at 0 still starts an example
    assert example_lengths(torch.tensor([[0, 1, 0, 0], [3, 4, 0, 1]]), 2, 4) == [2, 1, 1, 2, 2]
    # position ids given once for every row (unsqueezed, not expanded)
    assert example_lengths(torch.tensor([[0, 1, 2]]), 2, 3) == [3, 3]
    # any jump starts an example, as transformers reads packed position ids, not only a restart at 0
    assert example_lengths(torch.tensor([[0, 1, 2, 5, 6, 7]]), 1, 6) == [3, 3]


@pytest.mark.parametrize("position_ids", [
    torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]]),  # one flattened micro-batch (TRL's padding-free)
    torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 5]]),  # side by side, with a padding token
])
def test_packed_examples_get_the_numbers_of_the_block_diagonal_mask(position_ids):
    query, key, value = packed_inputs(position_ids)
    out, weights = sdpa_varlen_forward(Heads(), query, key, value, None, position_ids=position_ids)
    assert weights is None and out.shape == (query.shape[0], query.shape[2], 4, 16)
    expected = block_causal_reference(query, key, value, position_ids)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    # the control: one causal pass over the row mixes the examples
    leaky = block_causal_reference(query, key, value, torch.arange(position_ids.shape[1])[None])
    assert (leaky - expected).abs().max() > 1e-3


def test_with_a_mask_or_a_cache_it_is_plain_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = torch.tensor([[1, 1, 0, 1, 2, 3]])  # a left-padded prompt: a 0 that is not a restart
    query, key, value = packed_inputs(position_ids, requires_grad=False)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[..., :2] = False
    mask[..., :2, :2] = torch.eye(2, dtype=torch.bool)
    got, _ = sdpa_varlen_forward(Heads(), query, key, value, mask, position_ids=position_ids)
    want, _ = sdpa_attention_forward(Heads(), query, key, value, mask)
    assert torch.equal(got, want)
    # decoding: one new query over the cached keys
    got, _ = sdpa_varlen_forward(Heads(), query[:, :, -1:], key, value, None, position_ids=position_ids[:, -1:])
    want, _ = sdpa_attention_forward(Heads(), query[:, :, -1:], key, value, None)
    assert torch.equal(got, want)
    # the mask function: none for a training pass, sdpa's whenever a 2D mask or a cache offset is there
    assert varlen_mask(1, 6, 6) is None
    padded = varlen_mask(1, 6, 6, attention_mask=torch.tensor([[False, True, True, True, True, True]]))
    assert padded is not None and padded.shape == (1, 1, 6, 6) and not padded[0, 0, :, 0].any()


def test_rows_of_one_example_each_take_one_batched_call(monkeypatch):
    """An unpadded batch without packing (generation's prompt pass on equal-length prompts): one sdpa call,
    not one per row."""
    import finetune.attention as attention

    calls = []
    real = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    position_ids = torch.arange(5)[None]
    query, key, value = packed_inputs(position_ids.expand(3, -1), requires_grad=False)
    got, _ = sdpa_varlen_forward(Heads(), query, key, value, None, position_ids=position_ids)
    assert calls == [query.shape]
    torch.testing.assert_close(got, block_causal_reference(query, key, value, position_ids))
    calls.clear()
    sdpa_varlen_forward(Heads(), query, key, value, None, position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    assert len(calls) == 6  # two examples in each of three rows


def test_models_it_was_not_checked_on_are_refused():
    from types import SimpleNamespace

    from finetune.config import ConfigError, resolve
    from finetune.model import check_attention

    cfg = resolve("single", "tiny", None, {"eval_file": "", "packing": "true"}, {}, None)
    check_attention(SimpleNamespace(model_type="qwen3_moe", sliding_window=None), cfg, "sdpa_varlen")
    with pytest.raises(ConfigError, match="set attn_implementation=sdpa"):
        check_attention(SimpleNamespace(model_type="gemma3"), cfg, "sdpa_varlen")
    with pytest.raises(ConfigError, match="sliding window of 4096; set attn_implementation=sdpa"):
        check_attention(SimpleNamespace(model_type="qwen3", sliding_window=4096), cfg, "sdpa_varlen")


def test_sliding_window_models_are_refused_with_the_setting_to_use():
    position_ids = torch.tensor([[0, 1, 0, 1]])
    query, key, value = packed_inputs(position_ids, requires_grad=False)
    with pytest.raises(ValueError, match="attn_implementation=sdpa"):
        sdpa_varlen_forward(Heads(), query, key, value, None, position_ids=position_ids, sliding_window=2)


def test_a_model_loaded_with_it_trains_and_generates_as_with_sdpa():
    """The tiny MoE through from_pretrained: the same packed loss as sdpa's masks, and the same greedy answers
    for left-padded prompts (generation eval runs on the training model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.model import resolve_model_path

    path = resolve_model_path("tiny-moe")
    tokenizer = AutoTokenizer.from_pretrained(path)
    models = {name: AutoModelForCausalLM.from_pretrained(path, attn_implementation=name).eval()
              for name in ("sdpa", register())}
    torch.manual_seed(0)
    ids = torch.randint(5, 3000, (1, 40))
    position_ids = torch.cat([torch.arange(n) for n in (15, 10, 15)])[None]
    with torch.no_grad():
        # use_cache=False as the trainer forwards (TRL's compute_loss): sdpa keeps packed examples apart only
        # without a cache
        losses = {name: m(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False).loss
                  for name, m in models.items()}
    torch.testing.assert_close(losses["sdpa"], losses["sdpa_varlen"])
    tokenizer.padding_side = "left"
    prompts = tokenizer(["事件の記事", "警察は容疑者を逮捕した。ニュースの記事です"], return_tensors="pt", padding=True)
    answers = {name: m.generate(**prompts, max_new_tokens=12, do_sample=False) for name, m in models.items()}
    assert torch.equal(answers["sdpa"], answers["sdpa_varlen"])
