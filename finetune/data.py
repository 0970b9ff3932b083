"""Training data for the trainer: records -> TRL prompt/completion rows.

Rows come from the one prompt builder (`core.prompt`), so the loss
falls on the assistant answer only, `<|im_end|>` included (TRL's
completion mask covers everything the template adds after the prompt).
"""

from __future__ import annotations

import random

from core.prompt import record_prompt_completion
from core.records import load_records, seeded_subset
from data_tools.stats import percentiles, token_lengths

def load_split(path: str, limit: int, seed: int) -> list[dict]:
    """Records of one file; `limit` > 0 keeps a seeded random subset (order kept)."""
    records = seeded_subset(load_records(path), limit, seed)
    return records


def to_dataset(records: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{**record_prompt_completion(r), "source": r.get("source", "")} for r in records])


def labels_ending_at(labels: list[int], end_of_turn_id: int) -> list[int]:
    """Labels after the last trained <|im_end|> become -100 (the template's trailing newline)."""
    labels = list(labels)
    ends = [i for i, label in enumerate(labels) if label == end_of_turn_id]
    if ends:
        labels[ends[-1] + 1:] = [-100] * (len(labels) - ends[-1] - 1)
    return labels


def end_loss_at_end_of_turn(dataset, end_of_turn_id: int):
    return dataset.map(lambda row: {"labels": labels_ending_at(row["labels"], end_of_turn_id)},
                       desc="Ending the loss at <|im_end|>")


def length_report(records: list[dict], tokenizer, max_length: int, sample: int = 5000) -> dict:
    """Token-length percentiles and how many examples `max_length` would cut.

    A cut example loses the end of its answer (and its `<|im_end|>`), which
    teaches the model not to stop, so this is reported, never silent."""
    subset = records if len(records) <= sample else random.Random(0).sample(records, sample)
    lengths = token_lengths(subset, tokenizer)
    over = sum(n > max_length for n in lengths)
    scale = len(records) / max(len(subset), 1)
    return {"examples": len(records), "measured": len(subset), "tokens": percentiles(lengths),
            "over_max_length": round(over * scale), "max_length": max_length}
