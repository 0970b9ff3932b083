"""Rank roles from each launcher's environment (core/distributed.py) and the launch checks of
finetune/nodes.py that need no second process (the two-node runs: tests/test_multinode.py)."""

import json
import os
import subprocess

import pytest

from conftest import REPO

from core import distributed
from core.errors import ConfigError
from finetune.cli import build_parser, split_overrides
from finetune.nodes import LAUNCH_FILE, check_resume_launch, describe_launch

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "GROUP_RANK", "CROSS_RANK")


@pytest.fixture
def launcher_env(monkeypatch):
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, node, nodes, local_zero, rank_zero", [
    ({}, 0, 1, True, True),  # plain python
    # torchrun --nnodes=2 --nproc_per_node=4: the second node's second process
    ({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}, 1, 2, False, False),
    # the same node's first process: per-node work, not run-wide work
    ({"RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}, 1, 2, True, False),
    # DeepSpeed's launcher with a hostfile of 2 hosts x 2 slots
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "CROSS_RANK": "1"}, 1, 2, True, False),
    # a launcher that names no node: derived from the ranks, one node
    ({"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4"}, 0, 1, False, False),
])
def test_rank_roles(launcher_env, env, node, nodes, local_zero, rank_zero):
    for key, value in env.items():
        launcher_env.setenv(key, value)
    assert distributed.node_rank() == node and distributed.nodes() == nodes
    assert distributed.is_local_zero() is local_zero and distributed.is_rank_zero() is rank_zero


def test_resume_needs_the_launch_that_wrote_the_checkpoint(tmp_path, launcher_env):
    table = {"nodes": 2, "ranks_per_node": 1, "world_size": 2,
             "hosts": [{"node": 0, "host": "a", "ranks": [0], "devices": ["cpu"]},
                       {"node": 1, "host": "b", "ranks": [1], "devices": ["cpu"]}]}
    (tmp_path / LAUNCH_FILE).write_text(json.dumps(table))
    checkpoint = tmp_path / "checkpoint-2"
    with pytest.raises(ConfigError, match=r"checkpoint-2 was written by 2 node\(s\) x 1 rank\(s\) \(world size 2\), "
                                          r"this launch has world size 1 .*same number of ranks"):
        check_resume_launch(tmp_path, checkpoint)
    launcher_env.setenv("WORLD_SIZE", "2")
    launcher_env.setenv("LOCAL_WORLD_SIZE", "1")
    check_resume_launch(tmp_path, checkpoint)  # the same world size: fine
    check_resume_launch(tmp_path / "older", checkpoint)  # no record (a run from before): nothing to hold it to
    assert describe_launch(table) == ("launch: 2 node(s) x 1 rank(s) = world size 2: node 0 a (ranks 0), "
                                      "node 1 b (ranks 1)")


def test_deepspeed_launcher_local_rank_argument_is_accepted():
    """`deepspeed --hostfile H qwen_finetune.py ...` appends --local_rank=N: read, not a config key."""
    for form in (["--local_rank=1"], ["--local_rank", "1"], ["--local-rank=1"]):
        args, extra = build_parser("qwen_finetune.py", "").parse_known_args(["--mode", "single", *form, "lr=1"])
        assert args.local_rank == 1 and split_overrides(extra) == ["lr=1"]


def slurm_translation():
    import importlib.util

    spec = importlib.util.spec_from_file_location("torchrun_args", REPO / "scripts" / "slurm" / "torchrun_args.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SLURM_JOB = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_GPUS_ON_NODE": "8"}


@pytest.mark.parametrize("env, expected", [
    (SLURM_JOB, ["--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu03:29956",
                 "--rdzv-id=123456"]),
    # a typed GPU request and a plain host list; MASTER_PORT wins over the derived port
    ({**SLURM_JOB, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4", "SLURM_JOB_NODELIST": "a100-n7,a100-n9",
      "MASTER_PORT": "29400"},
     ["--nnodes=2", "--nproc_per_node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=a100-n7:29400", "--rdzv-id=123456"]),
    ({**SLURM_JOB, "SLURM_JOB_NODELIST": "rack2-node[11-12,15]", "SLURM_JOB_NUM_NODES": "3"},
     ["--nnodes=3", "--nproc_per_node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=rack2-node11:29956",
      "--rdzv-id=123456"]),
])
def test_slurm_environment_to_torchrun_arguments(env, expected):
    assert slurm_translation().torchrun_args(env) == expected


@pytest.mark.parametrize("env, message", [
    ({}, r"not inside a Slurm allocation \(SLURM_JOB_ID, SLURM_JOB_NODELIST unset\)"),
    ({**SLURM_JOB, "SLURM_GPUS_ON_NODE": ""}, r"no GPUs .*--gpus-per-node"),
    ({**SLURM_JOB, "SLURM_GPUS_ON_NODE": "lots"}, r"SLURM_GPUS_ON_NODE='lots': cannot read a GPU count"),
])
def test_slurm_translation_outside_an_allocation_says_what_is_missing(env, message):
    module = slurm_translation()
    with pytest.raises(module.NotInAllocation, match=message):
        module.torchrun_args(env)


def test_batch_script_launches_one_torchrun_agent_per_node(tmp_path):
    """train.sbatch as sbatch runs it on the first node, with `srun` (which needs a cluster) replaced by a
    script that prints the command it was given."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\nprintf "srun"; printf " %s" "$@"; echo\n')
    (fake / "srun").chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **SLURM_JOB,
           "SLURM_SUBMIT_DIR": str(REPO), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    script = str(REPO / "scripts" / "slurm" / "train.sbatch")
    done = subprocess.run(["bash", script, "--mode", "single", "--preset", "qwen3-30b-a3b", "output_dir=/shared/q"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    srun = done.stdout.strip().splitlines()[-1]
    assert srun == ("srun --kill-on-bad-exit=1 --ntasks-per-node=1 .venv/bin/python -m torch.distributed.run "
                    "--nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=gpu03:29956 --rdzv-id=123456 "
                    "qwen_finetune.py --mode single --preset qwen3-30b-a3b output_dir=/shared/q")
    outside = subprocess.run(["bash", script, "--mode", "single"], capture_output=True, text=True, timeout=60,
                             env={**env, "SLURM_JOB_ID": ""})
    assert outside.returncode != 0 and "error: not inside a Slurm allocation" in outside.stderr
    assert "srun" not in outside.stdout
