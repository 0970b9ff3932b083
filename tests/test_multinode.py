"""Two nodes on one machine: two torchrun agents joined by a c10d rendezvous (gloo), one process each,
exactly as `torchrun --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT` runs on two hosts
(docs/multi-node.md). The tiny MoE with the generation eval on; one node killed mid-run (its agent and its
workers: torchrun starts workers in sessions of their own) and the run resumed on both nodes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, free_port
from test_trainer import summary

ARGS = ["--mode", "single", "--backend", "hf", "max_train_samples=48", "max_steps=4", "eval_max_samples=8",
        "gen_eval_max_samples=4", "gen_eval_batch_size=2", "micro_batch_size=4", "logging_steps=1", "eval_steps=2",
        "save_steps=2", "save_total_limit=3", "ddp_timeout=60",  # survivors of a dead node give up within a minute
        "extra_callbacks=trainer_hooks.HoldNodeAtStep"]


def start_nodes(logs: Path, cwds: list[Path], args: list[str], env: dict | None = None) -> list[subprocess.Popen]:
    """One torchrun agent per "node", each in its own session (so a node can be killed as a whole)."""
    port = free_port()
    # one torch thread per process, as torchrun sets it for several ranks on one node: two "nodes" of two
    # threads each on a 2-core machine would spend their time contending
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "HOLD_AT_STEP": "-1",
                "HOLD_NODE": "-1", "HOLD_FILE": str(logs / "held"), "OMP_NUM_THREADS": "1", **(env or {})}
    agents = []
    for node, cwd in enumerate(cwds):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}",
               str(REPO / "qwen_finetune.py"), *args]
        log = open(logs / f"node{node}.log", "w", encoding="utf-8")
        agents.append(subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True))
    return agents


def finish(logs: Path, agents: list[subprocess.Popen], timeout: int = 900) -> tuple[list[int], str]:
    deadline = time.time() + timeout
    codes = []
    for agent in agents:
        try:
            codes.append(agent.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            kill_node(agent)
            codes.append(None)
    return codes, "\n".join((logs / f"node{n}.log").read_text(encoding="utf-8") for n in range(len(agents)))


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a node: its agent and every process under it (the workers are in their own sessions)."""
    family = [psutil.Process(agent.pid)]
    family += family[0].children(recursive=True)
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    agent.wait(timeout=60)


def test_two_nodes_one_killed_mid_run_resume_gives_the_uninterrupted_losses(tmp_path, mlflow_server):
    uri, _ = mlflow_server
    full = tmp_path / "full"
    codes, output = finish(tmp_path, start_nodes(tmp_path, [tmp_path, tmp_path],
                                                 [*ARGS, f"output_dir={full}", "mlflow=true",
                                                  f"mlflow_tracking_uri={uri}", "mlflow_experiment=two-nodes"]))
    assert codes == [0, 0], output[-6000:]
    # run-wide work on global rank 0 alone: one summary printed, one folder, one MLflow run
    assert output.count("=== run summary ===") == 1
    assert "launch: 2 node(s) x 1 rank(s) = world size 2: node 0 " in output
    s = summary(full)
    assert s["world_size"] == 2 and s["launch"]["nodes"] == 2 and s["launch"]["ranks_per_node"] == 1
    assert [h["ranks"] for h in s["launch"]["hosts"]] == [[0], [1]]
    assert json.loads((full / "single" / "gen_metrics_step2.json").read_text())["gen_num_examples"] == 4
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert len(runs) == 1
    params = runs[0].data.params  # every node's host, devices and ranks, gathered to rank 0
    assert params["launch.nodes"] == "2" and params["launch.world_size"] == "2"
    assert [(h["node"], h["ranks"], h["devices"]) for h in json.loads(params["launch.hosts"])] == \
        [(0, [0], ["cpu"]), (1, [1], ["cpu"])]
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert logged == [1, 2, 3, 4]  # each step once: no second rank or node logged it again

    # the same run with node 1 held after step 3 (checkpoint-2 written), then killed outright
    killed = tmp_path / "killed"
    agents = start_nodes(tmp_path, [tmp_path, tmp_path], [*ARGS, f"output_dir={killed}"],
                         {"HOLD_AT_STEP": "3", "HOLD_NODE": "1"})
    deadline = time.time() + 600
    while not (tmp_path / "held").is_file() and time.time() < deadline and agents[1].poll() is None:
        time.sleep(0.5)
    assert (tmp_path / "held").is_file(), (tmp_path / "node1.log").read_text()[-4000:]
    kill_node(agents[1])
    # node 0, blocked in step 4's gradient all-reduce, fails instead of hanging
    assert agents[0].wait(timeout=240) != 0
    stage = killed / "single"
    assert (stage / "checkpoint-2").is_dir() and not (stage / "COMPLETE").exists()

    codes, output = finish(tmp_path, start_nodes(tmp_path, [tmp_path, tmp_path],
                                                 [*ARGS, f"output_dir={killed}", "--resume"]))
    assert codes == [0, 0], output[-6000:]
    assert "resuming from" in output and "checkpoint-2" in output
    # the run it replaced: the same losses step by step, final metrics and best-step choice (same data order,
    # schedule, optimizer and RNG state on both nodes; step 2 was judged before the kill, not again after it)
    resumed, uninterrupted = summary(killed), summary(full)
    assert [step for step, _ in resumed["train_losses"]] == [1, 2, 3, 4]
    for (step, loss), (_, reference) in zip(resumed["train_losses"], uninterrupted["train_losses"], strict=True):
        assert loss == pytest.approx(reference, rel=1e-5), (step, loss, reference)
    gen = {k: v for k, v in resumed["metrics"].items() if k.startswith("gen_")}
    assert gen and gen == {k: v for k, v in uninterrupted["metrics"].items() if k.startswith("gen_")}
    assert resumed["metrics"]["eval_loss"] == pytest.approx(uninterrupted["metrics"]["eval_loss"], rel=1e-5)
    assert [e["step"] for e in resumed["best"]["evaluations"]] == [2, 4]
    assert resumed["best"] == uninterrupted["best"]


def test_an_output_folder_that_is_not_shared_stops_every_node(tmp_path):
    """Node 1 starts in another folder and output_dir is relative: it resolves to a folder rank 0 never
    wrote, as a node-local disk would."""
    elsewhere = tmp_path / "node1"
    elsewhere.mkdir()
    codes, output = finish(tmp_path, start_nodes(tmp_path, [tmp_path, elsewhere], [*ARGS, "output_dir=out"]),
                           timeout=400)
    assert codes[0] != 0 and codes[1] != 0
    assert output.count("is not one folder for every node") == 2, output[-4000:]  # said by both nodes' ranks
    assert "node 1 (" in output and str(elsewhere / "out") in output
    assert not (tmp_path / "out" / "single").exists()  # stopped before anything was trained or written
