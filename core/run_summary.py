"""run_summary.json, one format for every stack.

Our trainer (finetune/pipeline.py, one per stage) and the Axolotl plugins (callbacks/axolotl_plugins.py)
build it with `build` from the trainer's log, so `parity.py compare`, the run summaries printed at the
end and the tests read the same keys from either. Each stack adds what only it knows (ours: packing,
weight storage, the best step, ...) next to the shared keys. Pure stdlib.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import DataError
from core.records import atomic_write_text, load_json
from core.redact import redact

FORMAT = 1
# what every run_summary.json holds, whichever stack wrote it
SHARED_KEYS = ("format", "backend", "model", "global_step", "train_losses", "metrics")


def train_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, training loss) of each logged step."""
    return [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]


def final_metrics(log_history: list[dict]) -> dict:
    """What the log holds at the end: the end-of-training figures (train_runtime, train_loss, ...), the
    last evaluation's eval_* and the last generation eval's gen_*."""
    metrics: dict = {}
    for marker, prefix in (("train_runtime", ""), ("eval_loss", "eval_"), ("gen_num_examples", "gen_")):
        last = next((e for e in reversed(log_history) if marker in e), None)
        if last is not None:
            metrics.update({k: v for k, v in last.items() if k.startswith(prefix) and k not in ("step", "epoch")})
    return metrics


def build(*, backend: str, model: str, global_step: int, log_history: list[dict], metrics: dict | None = None,
          **extra) -> dict:
    """The shared keys, then the stack's own. `metrics` defaults to `final_metrics(log_history)`."""
    return {"format": FORMAT, "backend": backend, "model": str(model), "global_step": global_step,
            "train_losses": train_losses(log_history),
            "metrics": final_metrics(log_history) if metrics is None else metrics, **extra}


def write(path: Path, summary: dict) -> None:
    """Written aside and renamed; secrets (a token in a URI, a password) redacted."""
    atomic_write_text(Path(path), [json.dumps(redact(summary), indent=2, ensure_ascii=False, default=str)])


def read(path: Path) -> dict:
    """A run_summary.json of either stack; a located error when it is not one."""
    data = load_json(path)
    missing = [k for k in SHARED_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"{path}: not a run summary of format {FORMAT} (missing {', '.join(missing)}); "
                        "it was written by an older version: train again, or compare its gen_metrics_step*.json")
    return data
