"""torchrun's multi-node arguments from Slurm's environment, one per line (scripts/slurm/train.sbatch).

    python scripts/slurm/torchrun_args.py        # inside an allocation (sbatch/salloc)

Nodes from SLURM_JOB_NUM_NODES; processes per node from the GPUs Slurm gave each node
(SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE, which may name a type: "h100:8"); the c10d rendezvous
on the allocation's first node (the batch script runs there), on MASTER_PORT or a port derived from
the job id (two jobs sharing a node do not collide); the job id as the rendezvous id.
"""

from __future__ import annotations

import os
import re
import sys


class NotInAllocation(Exception):
    pass


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: "gpu[03-04,07],cpu1" -> "gpu03", "node7,node9" -> "node7"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m or not m.group(1):
        raise NotInAllocation(f"SLURM_JOB_NODELIST={nodelist!r} is not a host list")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def gpus_per_node(env: dict) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "").strip()
        if value:
            count = value.split("(")[0].split(":")[-1]  # "8", "h100:8", "8(x2)"
            if count.isdigit() and int(count) > 0:
                return int(count)
            raise NotInAllocation(f"{key}={value!r}: cannot read a GPU count from it")
    raise NotInAllocation("Slurm gave no GPUs to this job (SLURM_GPUS_ON_NODE and SLURM_GPUS_PER_NODE are unset): "
                          "ask for them with #SBATCH --gpus-per-node=N")


def torchrun_args(env: dict) -> list[str]:
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if not env.get(k)]
    if missing:
        raise NotInAllocation(f"not inside a Slurm allocation ({', '.join(missing)} unset): submit with "
                              "sbatch scripts/slurm/train.sbatch ...")
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    port = int(env.get("MASTER_PORT") or 29500 + int(env["SLURM_JOB_ID"]) % 1000)
    return [f"--nnodes={nodes}", f"--nproc_per_node={gpus_per_node(env)}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={first_host(env['SLURM_JOB_NODELIST'])}:{port}", f"--rdzv-id={env['SLURM_JOB_ID']}"]


def main() -> int:
    try:
        print("\n".join(torchrun_args(dict(os.environ))))
    except NotInAllocation as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
