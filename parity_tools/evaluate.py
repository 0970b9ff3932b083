"""`parity.py evaluate`: the shared evaluator on any PEFT adapter, ours or Axolotl's.

The base model's own tokenizer formats every prompt (the one prompt builder,
the model's chat template), whoever trained the adapter, so two adapters are
scored on identical inputs by `callbacks.generation_eval.evaluate_records`,
the code the training callback runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.records import DataError, atomic_write_text, file_sha256, seeded_subset, write_rows

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def check_paths(base_model: str, adapter: str | None) -> str:
    """The model's path, once a missing adapter or model folder has been named: before torch loads, so a
    wrong path costs a second, not the import of the whole stack. A hub id is checked by loading it."""
    from finetune.model import resolve_model_path

    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise DataError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    path = resolve_model_path(base_model)
    local = Path(path).expanduser()
    if (local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1) and not (
            local / "config.json").is_file():
        raise DataError(f"--base-model {base_model}: cannot load it (no config.json in {local}); give a model "
                        "folder, a hub id this machine can reach, or tiny-dense / tiny-moe")
    return path


def load_model(base_model: str, adapter: str | None, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.model import rank_device_map

    path = check_paths(base_model, adapter)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, DTYPES[dtype]),
                                                     device_map=rank_device_map())  # GPU: no host copy first
    except OSError as e:
        raise DataError(f"--base-model {base_model}: cannot load it ({str(e).splitlines()[0]}); give a model "
                        "folder, a hub id this machine can reach, or tiny-dense / tiny-moe") from None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def evaluate(base_model: str, adapter: str | None, data: str, out: Path, *, max_samples: int = 0,
             seed: int = 0, batch_size: int = 32, dtype: str = "float32") -> dict:
    from core.metrics import DEFAULT_FIELDS
    from core.formats import load_any_records

    records = seeded_subset(load_any_records(data, DEFAULT_FIELDS), max_samples, seed)
    if not records:
        raise DataError(f"{data}: no records to evaluate")
    check_paths(base_model, adapter)
    from callbacks.error_report import render as render_errors
    from callbacks.generation_eval import evaluate_records

    model, tokenizer = load_model(base_model, adapter, dtype)
    metrics, rows = evaluate_records(model, tokenizer, records, batch_size=batch_size)
    meta = {"base_model": base_model, "adapter": adapter, "data": data, "data_sha256": file_sha256(data),
            "max_samples": max_samples, "seed": seed, "dtype": dtype}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", [json.dumps({**metrics, "meta": meta}, indent=2, ensure_ascii=False)])
    write_rows(out / "predictions.jsonl", rows)
    atomic_write_text(out / "errors.md", [render_errors(rows, records, f"Errors: {adapter or base_model} on {data}")])
    return metrics
