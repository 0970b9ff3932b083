"""What a run ran on, for its summary and its MLflow params. Pure stdlib."""

from __future__ import annotations

import contextlib

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
             "unsloth", "unsloth_zoo", "deepspeed", "axolotl", "mlflow")


def library_versions() -> dict[str, str]:
    """Installed versions of the training stack (logged with every run)."""
    import importlib.metadata

    out = {}
    for lib in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[lib] = importlib.metadata.version(lib)
    return out
