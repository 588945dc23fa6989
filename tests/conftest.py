"""Shared fixtures: real components that tests start once per session."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MLFLOW_START_TIMEOUT_S = 120  # about 25 s on 2 idle cores; more while other suites run

# MLflow 3 reports usage to its vendor by default; tests (and CI without egress) keep it local.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Tables (Rich) in a subprocess's output are as wide as the page shows them, whether pytest's
# stdin is a terminal or (pytest-xdist's workers, CI) not.
os.environ["COLUMNS"] = "250"


# `make test` hands whole files to its workers in collection order: the longest files (2-6
# minutes each, measured on 2 cores) go first, so that no long file runs alone at the end.
LONGEST_FIRST = ("tests/test_validate_plan_moe.py", "tests/checkpoint/test_checkpoint_runs.py",
                 "tests/launch/test_launch_slurm.py", "tests/test_moe_train.py",
                 "tests/test_validate_plan.py", "tests/test_precision.py", "tests/test_docs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {path: rank for rank, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.nodeid.split("::", 1)[0], len(first)))


def require(what: str, why: str) -> None:
    """A missing real component: the test fails under CI=true (it must run there), else skips."""
    message = f"{what} is missing: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on loopback with a SQLite store and artifacts it serves itself (clients
    upload over HTTP, as they would to a remote server). Yields its URL."""
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if exe is None:
        require("the mlflow command", "pip install mlflow")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    # MLflow's job runner (huey consumer processes, for its GenAI jobs) is nothing the trainer
    # uses, and its workers poll on the 2 cores the tests share.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [exe, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
        while not _answers(f"{url}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:  # a graceful stop waits for idle keep-alive connections; no need to wait long
            server.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    process: subprocess.Popen

    # moto accepts any credentials; these keep boto from looking for real ones
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """`moto_server`: a real HTTP S3 endpoint on loopback, with one empty bucket."""
    exe = (shutil.which("moto_server", path=str(Path(sys.executable).parent))
           or shutil.which("moto_server"))
    if exe is None:
        require("the moto_server command", "pip install 'moto[server]'")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"{endpoint}/moto-api/"):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        bucket = "ultramesh"
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"),
                               timeout=10).close()
        os.environ.update(S3Server.env)  # for the tests' own reads of the bucket
        yield S3Server(endpoint, bucket, server)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless-capable Chromium (`apt-get install -y chromium`)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        require("chromium", "apt-get install -y chromium")
    return exe
