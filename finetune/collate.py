"""The collator for packed rows kept side by side (attention that splits nothing by position ids: sdpa, eager;
`sdpa_varlen` and FlashAttention get TRL's flattened padding-free batches instead).

Imported by the trainer after the backend is chosen: it subclasses TRL's collator, which Unsloth patches.
"""

from __future__ import annotations

from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Packed rows side by side, padded to the longest, with position ids restarting at each example and no
    attention mask: from those transformers builds each row's per-example causal mask
    (masking_utils.find_packed_sequence_indices; only without a mask and without a KV cache, which training
    does not use). A padding position (0) starts a one-token sequence of its own that no real token attends
    to, and its label is -100. Without a mask, the MoE router's aux loss averages over the padding too
    (a few % of the tokens; exact where micro_batch_size is 1)."""

    def __init__(self, pad_token_id: int):
        super().__init__(pad_token_id=pad_token_id, return_position_ids=True)

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch.pop("attention_mask", None)
        # an example's first token is not predicted from the one before it in the row (as TRL's padding-free
        # collator does; it matters for rehearsal text, which trains every token)
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch
