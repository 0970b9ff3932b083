"""Rank and world size, read once from the launcher's environment (torchrun, accelerate and DeepSpeed
all set RANK, LOCAL_RANK and WORLD_SIZE), so they are known before any process group exists."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return rank() == 0
