"""The embedded tiny data set: synthetic news small enough for minutes on 2 CPU cores.

Both stacks train on the same files: the trainer's `tiny` preset and the
tiny Axolotl config (through their `messages` export).
"""

from __future__ import annotations

from pathlib import Path

from core.records import write_rows
from data_tools import prepare, synth

TINY_COUNTS = {"positives": 1500, "negatives": 1500, "val_positives": 100, "val_negatives": 100,
               "general": 1000}


def general_text(split: str, count: int) -> list[dict]:
    """Plain news text like the tiny models' pre-training corpus (`{"text": ...}` rows): what
    the base already knew, for rehearsal and for measuring forgetting."""
    kinds = ("positive", "negative")
    return [{"text": synth.write_article(0, split, kinds[i % 2], i, synth.shapes_for(kinds[i % 2]), False)[1]}
            for i in range(count)]


def ensure_tiny_data(files: dict[str, str]) -> None:
    """Write the missing files of {kind: path} once (deterministic, seed 0); kinds: stage1_train_file
    (positives), train_file / stage2_train_file (the mix), eval_file (validation mix), rehearsal_data
    and general_eval_file (plain text)."""
    if all(Path(p).is_file() for p in files.values()):
        return
    n = TINY_COUNTS
    print(f"writing the embedded synthetic data set into {Path(next(iter(files.values()))).parent} (once)")
    positives = synth.generate(0, "train", "positive", n["positives"])
    negatives = synth.generate(0, "train", "negative", n["negatives"])
    val_pos = synth.generate(0, "val", "positive", n["val_positives"], held_out_names=True)
    val_neg = synth.generate(0, "val", "negative", n["val_negatives"], held_out_names=True)
    mix = prepare.merge(positives, negatives, 1, len(negatives), seed=42)
    out = {
        "stage1_train_file": positives, "train_file": mix, "stage2_train_file": mix,
        "eval_file": prepare.validation_mix(val_pos, val_neg, 0.5, seed=42),
        "rehearsal_data": general_text("general", n["general"]),
        "general_eval_file": general_text("general-eval", n["general"] // 5),
    }
    for key, path in files.items():
        if not Path(path).is_file():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_rows(path, out[key])
