"""`sdpa_varlen`: exact attention for packed rows without a FlashAttention kernel.

Packed examples must not attend to each other. With plain sdpa, transformers turns the restarting position
ids into a block-diagonal mask over the whole row (masking_utils.find_packed_sequence_indices): every
row costs max_length^2 attention with an explicit mask, whatever its examples' lengths. Here each example
(a run of consecutive position ids) is attended on its own with sdpa's causal kernel, so a packed row costs
the sum of its examples' squared lengths, as FlashAttention's varlen kernel does, and the rows can be
flattened into one padding-free sequence like TRL's collator gives FlashAttention. Same numbers as the
masked path (tests/test_attention.py); measured in bench/train_throughput.py.

Anything that is not a full causal pass over a batch without an attention mask (generation with its KV
cache, left-padded prompts) goes to transformers' sdpa unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from finetune.config_schema import SDPA_VARLEN as NAME
# The models whose mask functions this was checked against (tests/test_attention.py): their masks are
# causal, plus padding and packing, and nothing else (no sliding window, image blocks or other overlays)
MODEL_TYPES = ("qwen3", "qwen3_moe")


def varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """No mask for a training pass (no 2D mask, no cache): the attention splits by position ids instead.
    Everything else is sdpa's mask."""
    if attention_mask is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def example_lengths(position_ids: torch.Tensor, batch: int, length: int) -> list[int]:
    """Lengths of the examples in `batch` rows of `length` tokens, read row after row: an example starts at
    each row's start and wherever the position id does not follow the one before (a restart at 0 in TRL's
    packed rows; as transformers' find_packed_sequence_indices splits)."""
    flat = position_ids.expand(batch, -1).reshape(-1)
    breaks = torch.ones_like(flat, dtype=torch.bool)
    breaks[1:] = flat[1:] != flat[:-1] + 1
    breaks[::length] = True
    bounds = breaks.nonzero().flatten().tolist() + [batch * length]
    return [end - start for start, end in zip(bounds, bounds[1:])]


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        position_ids=None, sliding_window=None, **kwargs):
    """query (batch, heads, length, dim), key/value (batch, kv_heads, length, dim) -> (batch, length, heads,
    dim), as every transformers attention function."""
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if sliding_window is not None:
        raise ValueError(f"attn_implementation={NAME} has no sliding-window attention; set "
                         "attn_implementation=sdpa for this model")
    batch, heads, length, dim = query.shape
    lengths = example_lengths(position_ids, batch, length)
    if len(lengths) == batch:  # one example per row: one causal call for the whole batch
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)

    def examples(t):  # (batch, h, length, dim) -> one (1, h, n, dim) per example; split's backward is one cat
        flat = t.transpose(0, 1).reshape(1, t.shape[1], batch * length, dim)
        return torch.split(flat, lengths, dim=2)

    outputs = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, **kwargs)[0]
               for q, k, v in zip(examples(query), examples(key), examples(value))]
    return torch.cat(outputs, dim=1).view(batch, length, heads, dim), None


def register() -> str:
    """Make `attn_implementation=NAME` known to transformers (idempotent); returns the name."""
    from trl.trainer import sft_trainer

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
    # TRL warns of cross-contamination for packing on any attention outside this set; ours keeps the examples
    # apart as those kernels do (tests/test_attention.py, tests/packing_check.py)
    sft_trainer.FLASH_ATTENTION_VARIANTS.add(NAME)
    return NAME
