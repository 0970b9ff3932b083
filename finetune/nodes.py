"""The run across processes and nodes: the process group (created before the trainer), the launch table
(nodes x ranks, hosts, devices) that the run summary and MLflow record, the output folder checked to be
one folder for every node, and a resume held to the launch that wrote its checkpoints. Rank roles:
core/distributed.py."""

from __future__ import annotations

import json
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from core.distributed import is_rank_zero, local_rank, node_rank, nodes, rank, world_size
from core.errors import ConfigError
from core.records import atomic_write_text

if TYPE_CHECKING:
    from finetune.config_schema import FinetuneConfig

LAUNCH_FILE = "launch.json"  # in a stage's folder: the launch that trained it


def this_rank() -> dict:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"rank": rank(), "local_rank": local_rank(), "node": node_rank(), "host": socket.gethostname(),
            "device": device}


def gather(value):
    """`value` of every rank, in rank order, on every rank (one process: [value])."""
    if world_size() <= 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def launch_table() -> dict:
    """{"nodes", "ranks_per_node", "world_size", "hosts": [{"node", "host", "ranks", "devices"}]}: every
    rank's place, gathered (a collective: every rank calls it)."""
    ranks = gather(this_rank())
    hosts: dict[int, dict] = {}
    for r in ranks:
        node = hosts.setdefault(r["node"], {"node": r["node"], "host": r["host"], "ranks": [], "devices": []})
        node["ranks"].append(r["rank"])
        node["devices"].append(r["device"])
    per_node = sorted({len(h["ranks"]) for h in hosts.values()})
    return {"nodes": len(hosts), "ranks_per_node": per_node[0] if len(per_node) == 1 else per_node,
            "world_size": len(ranks), "hosts": [hosts[n] for n in sorted(hosts)]}


def describe_launch(table: dict) -> str:
    nodes_part = ", ".join(f"node {h['node']} {h['host']} (ranks {','.join(map(str, h['ranks']))})"
                           for h in table["hosts"])
    return (f"launch: {table['nodes']} node(s) x {table['ranks_per_node']} rank(s) = world size "
            f"{table['world_size']}: {nodes_part}")


def check_shared_output(output_dir: str) -> None:
    """With several nodes, rank 0 alone writes the run's folder (checkpoints, adapter, summary) and every
    rank reads a checkpoint back on --resume: the folder must be the same one on every node. Rank 0 writes a
    one-off file there; every rank looks for it; a node that does not see it stops the run on every rank."""
    if nodes() <= 1:
        return
    import torch.distributed as dist

    token = [secrets.token_hex(8) if is_rank_zero() else None]
    dist.broadcast_object_list(token, src=0)
    folder = Path(output_dir)
    probe = folder / f".shared-check-{token[0]}"
    if is_rank_zero():
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0], encoding="utf-8")
    dist.barrier()
    seen = probe.is_file() and probe.read_text(encoding="utf-8") == token[0]
    views = gather({"seen": seen, "node": node_rank(), "host": socket.gethostname(),
                    "path": str(folder.resolve())})  # also the barrier before rank 0 removes the probe
    if is_rank_zero():
        probe.unlink(missing_ok=True)
    blind = {(v["node"], v["host"], v["path"]) for v in views if not v["seen"]}
    if blind:
        where = "; ".join(f"node {n} ({host}) sees {path}" for n, host, path in sorted(blind))
        raise ConfigError(
            f"output_dir {output_dir} is not one folder for every node: rank 0 wrote a check file into "
            f"{views[0]['path']} on node {views[0]['node']} ({views[0]['host']}), but {where} without it. "
            "Put output_dir on a filesystem every node mounts at the same path (NFS, Lustre, ...), given as an "
            "absolute path: rank 0 alone writes checkpoints, adapter and summary, and --resume reads them "
            "on every rank")


def record_launch(stage_folder: Path, table: dict | None) -> None:
    if table is not None and is_rank_zero():
        atomic_write_text(stage_folder / LAUNCH_FILE, [json.dumps(table, indent=2)])


def check_resume_launch(stage_folder: Path, checkpoint: Path) -> None:
    """A checkpoint resumes on the number of ranks that wrote it: the data order (each rank's shard), the
    batch per step and DeepSpeed's per-rank optimizer shards all follow the world size."""
    path = stage_folder / LAUNCH_FILE
    if not path.is_file():
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    if before.get("world_size") != world_size():
        raise ConfigError(
            f"{checkpoint} was written by {before.get('nodes')} node(s) x {before.get('ranks_per_node')} rank(s) "
            f"(world size {before.get('world_size')}), this launch has world size {world_size()} "
            f"({nodes()} node(s)): resume with the same number of ranks (torchrun --nnodes / --nproc_per_node), "
            "or start over with --overwrite")


def init_distributed(cfg: FinetuneConfig) -> None:
    """The process group, created here (before the trainer) so rank 0 can write shared files while the
    others wait. accelerate then keeps it as it is, so the timeout and the device are given here: NCCL's
    own 10-minute default would end the run while rank 0 tokenises a large set alone."""
    if world_size() <= 1:
        return
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    kwargs = {"timeout": datetime.timedelta(seconds=cfg.ddp_timeout)}
    if torch.cuda.is_available():
        from finetune.model import local_gpu

        device = torch.device("cuda", local_gpu())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds the communicator to this rank's GPU: no guessing, no hang
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **kwargs)


def empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def wait_for_rank_zero() -> None:
    """Other ranks wait while rank 0 writes shared files (tiny data, cleared folders)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()
