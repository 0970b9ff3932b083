import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MLFLOW = Path(sys.executable).parent / "mlflow"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on two workers (pyproject.toml): one torch thread in each worker and in every process a
    # test starts, so the two share the cores instead of contending for them (two 2-thread processes on
    # 2 cores ran tests/test_multinode.py 2.4x slower than two 1-thread ones).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


def pytest_xdist_auto_num_workers(config) -> int:
    """Two workers, each given whole files (their module fixtures stay in one process): while one process
    imports or waits, the other computes. None for the GPU tests (`-m gpu`: they share one device)."""
    if "gpu" in (config.getoption("markexpr") or ""):
        return 0
    return min(2, os.cpu_count() or 1)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a repository command as a user would, in a fresh interpreter (`env`: variables to add)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def axolotl_ready():
    """Axolotl's venv must exist: the README's test command builds it (scripts/setup_axolotl.sh)."""
    from parity_tools.axolotl_env import AxolotlMissing, axolotl_python

    try:
        return axolotl_python()
    except AxolotlMissing as e:
        pytest.fail(str(e))


@pytest.fixture
def cli():
    return run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        # MLflow's server-side job runner (8 worker processes polling a queue) serves features we never use
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start within 120 s")
    yield uri, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
