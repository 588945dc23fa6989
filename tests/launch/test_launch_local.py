"""`python -m launch cluster=local`: torchrun on this machine. A rank SIGKILLed mid-run makes
torchrun restart the group, which resumes from the newest checkpoint into the same MLflow run and
ends with the weights of a run nobody killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.dcp_weights import weights
from tests.launch.helpers import REPO, SMALL, committed_step, env, launch, run_id

pytestmark = pytest.mark.slow


def local_args(run_dir: Path, mlflow_server: str) -> list[str]:
    return ["cluster=local", "trainer.devices=2", *SMALL, "launch.max_restarts=1",
            f"tracking.uri={mlflow_server}", "tracking.experiment=launch-local",
            f"launch.run_dir={run_dir}"]


def ranks(root: psutil.Process) -> list[psutil.Process]:
    """The training processes torchrun started (not torchrun itself)."""
    found = []
    for proc in root.children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "trainer" in cmd and "torch.distributed.run" not in cmd:
            found.append(proc)
    return found


def test_torchrun_restarts_a_killed_rank_from_the_newest_checkpoint(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    reference = launch(*local_args(tmp_path / "reference", mlflow_server))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert committed_step(tmp_path / "reference") == 12

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "launch", *local_args(run_dir, mlflow_server)],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while (committed_step(run_dir) or 0) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        first_run = run_id(run_dir)
        victims = [p for p in ranks(psutil.Process(proc.pid))
                   if p.environ().get("LOCAL_RANK") == "1"]
        assert len(victims) == 1
        os.kill(victims[0].pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "resuming from" in out
    assert committed_step(run_dir) == 12
    assert run_id(run_dir) == first_run
    assert f"MLflow run {first_run}" in out

    client = MlflowClient(mlflow_server)
    run = client.get_run(first_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["attempt"] == "2"
    assert run.data.tags["torchrun.restart_count"] == "1"
    killed = weights(str(run_dir / "checkpoints" / "step-00000012.ckpt"))
    uninterrupted = weights(str(tmp_path / "reference" / "checkpoints" / "step-00000012.ckpt"))
    assert killed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(killed[name], tensor), name
