"""Axolotl's own virtual environment (scripts/setup_axolotl.sh): find it and run in it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Axolotl otherwise retries telemetry uploads to the internet.
QUIET_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"}


class AxolotlMissing(RuntimeError):
    pass


def axolotl_python() -> Path:
    """$AXOLOTL_PYTHON, else the cached environment scripts/setup_axolotl.sh built."""
    if os.environ.get("AXOLOTL_PYTHON"):
        return Path(os.environ["AXOLOTL_PYTHON"])
    done = subprocess.run(["bash", str(REPO / "scripts" / "setup_axolotl.sh"), "--path"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise AxolotlMissing(done.stderr.strip())
    return Path(done.stdout.strip().splitlines()[-1]) / "bin" / "python"


def axolotl_env(extra: dict | None = None) -> dict:
    """The environment for a process in Axolotl's venv: this repository importable, telemetry off."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **QUIET_ENV, "PYTHONPATH": path, **(extra or {})}
