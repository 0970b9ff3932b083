"""Rank, node and world size, read from the launcher's environment (torchrun, accelerate and DeepSpeed
all set RANK, LOCAL_RANK and WORLD_SIZE), so they are known before any process group exists.

Rank roles, the same on one node and on several:
- run-wide work on global rank 0 only (`is_rank_zero`): the output folder, checkpoints' adapter, the
  run summary, the MLflow run, the best adapter, export;
- per-node work on each node's local rank 0 (`is_local_zero`): files on that node's own disk (the tiny
  data, caches);
- every rank: its shard of the data and of the generation eval.
"""

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


def local_world_size() -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE; one node when neither is set."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return world_size()


def node_rank() -> int:
    """This node's index: torchrun's GROUP_RANK, DeepSpeed's CROSS_RANK, else derived from the ranks."""
    for key in ("GROUP_RANK", "CROSS_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return rank() // max(1, local_world_size())


def nodes() -> int:
    return max(1, world_size() // max(1, local_world_size()))


def is_local_zero() -> bool:
    return local_rank() == 0
