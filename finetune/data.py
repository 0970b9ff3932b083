"""Training data for the trainer: records -> TRL prompt/completion rows.

Rows come from the one prompt builder (`data_tools.prompt`), so the loss
falls on the assistant answer only, `<|im_end|>` included (TRL's
completion mask covers everything the template adds after the prompt).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from data_tools.prompt import record_prompt_completion
from data_tools.records import load_records, seeded_subset
from data_tools.stats import percentiles, token_lengths

# The embedded tiny data set: small enough for minutes on 2 CPU cores.
TINY_COUNTS = {"positives": 1500, "negatives": 1500, "val_positives": 100, "val_negatives": 100}


def ensure_tiny_data(cfg, files: dict[str, str]) -> None:
    """Write the tiny preset's synthetic files once (deterministic, seed 0)."""
    if all(Path(p).is_file() for p in files.values()):
        return
    from data_tools import prepare, synth
    from data_tools.records import write_rows

    n = TINY_COUNTS
    print(f"writing the embedded synthetic data set into {Path(cfg.train_file).parent} (once)")
    positives = synth.generate(0, "train", "positive", n["positives"])
    negatives = synth.generate(0, "train", "negative", n["negatives"])
    val_pos = synth.generate(0, "val", "positive", n["val_positives"], held_out_names=True)
    val_neg = synth.generate(0, "val", "negative", n["val_negatives"], held_out_names=True)
    mix = prepare.merge(positives, negatives, 1, len(negatives), seed=42)
    out = {
        "stage1_train_file": positives, "train_file": mix, "stage2_train_file": mix,
        "eval_file": prepare.validation_mix(val_pos, val_neg, 0.5, seed=42),
    }
    for key, path in files.items():
        if not Path(path).is_file():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_rows(path, out[key])


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_split(path: str, limit: int, seed: int) -> list[dict]:
    """Records of one file; `limit` > 0 keeps a seeded random subset (order kept)."""
    records = seeded_subset(load_records(path), limit, seed)
    return records


def to_dataset(records: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([record_prompt_completion(r) for r in records])


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
