"""The prompt builder's chats (core/prompt.py) rendered through a tokenizer's own chat template: the text a
model is given and its length in tokens. `tokenizer` is any Hugging Face tokenizer (no import here)."""

from __future__ import annotations

from typing import Sequence

from core.prompt import record_messages


def prompt_texts(records: Sequence[dict], tokenizer) -> list[str]:
    """What the model is given: each record's chat up to the assistant turn, in the tokenizer's template."""
    return [tokenizer.apply_chat_template(record_messages(r, with_answer=False), tokenize=False,
                                          add_generation_prompt=True) for r in records]


def prompt_lengths(records: Sequence[dict], tokenizer) -> list[int]:
    """Each record's prompt in tokens (what a generation batch is left-padded to the longest of)."""
    return [len(ids) for ids in tokenizer(prompt_texts(records, tokenizer), add_special_tokens=False)["input_ids"]]
