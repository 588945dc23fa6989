"""`python -m launch cluster=slurm` on a real two-node SLURM cluster (slurm_cluster.py): a job
that trains FSDP across both nodes; one preempted mid-run that checkpoints, requeues, resumes and
finishes as the same MLflow run with the losses of the uninterrupted one; one whose own time
limit warns it, twice, until `cluster.max_requeues` stops the requeues; and a Hydra sweep
submitted through hydra/launcher=slurm to the cluster's default partition."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch.helpers import REPO, SMALL, committed_step, env, launch, losses, run_id
from tests.launch.slurm_cluster import start

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 420
ENDED = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "GONE")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    yield from start(tmp_path_factory)


def slurm_args(slurm, run_dir: Path, mlflow_server: str) -> list[str]:
    # The cpu hardware has no inter-node link; the planner needs one to span two nodes.
    return ["cluster=slurm", "cluster.nodes=2", f"cluster.partition={slurm.partition}",
            "hardware.efa_bw_gbps=10", *SMALL, f"tracking.uri={mlflow_server}",
            "tracking.experiment=launch-slurm", f"launch.run_dir={run_dir}"]


@dataclass
class Finished:
    run_dir: Path
    stdout: str
    run_id: str
    losses: dict[int, float]


@pytest.fixture(scope="module")
def uninterrupted(slurm, mlflow_server, tmp_path_factory) -> Finished:
    from mlflow import MlflowClient

    run_dir = tmp_path_factory.mktemp("slurm-run")
    done = launch(*slurm_args(slurm, run_dir, mlflow_server), "launch.wait=true")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{slurm.logs()}"
    rid = run_id(run_dir)
    return Finished(run_dir, done.stdout, rid, losses(MlflowClient(mlflow_server), rid))


def test_a_two_node_job_trains_checkpoints_and_finishes_its_mlflow_run(
        uninterrupted: Finished, slurm, mlflow_server):
    from mlflow import MlflowClient

    out = uninterrupted.stdout
    job = re.search(r"submitted SLURM job (\d+)", out)
    assert job, out
    assert f"SLURM job {job.group(1)} ended: COMPLETED" in out
    assert f"MLflow run {uninterrupted.run_id}" in out
    assert str(uninterrupted.run_dir / f"slurm-{job.group(1)}.out") in out
    assert committed_step(uninterrupted.run_dir) == 12
    log = (uninterrupted.run_dir / f"slurm-{job.group(1)}.out").read_text()
    assert "on n[1-2]" in log  # both nodes
    assert "dp_shard=2" in log  # one FSDP mesh over the two nodes' ranks
    client = MlflowClient(mlflow_server)
    run = client.get_run(uninterrupted.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["slurm.job_id"] == job.group(1)
    assert sorted(uninterrupted.losses) == list(range(1, 13))
    script = client.download_artifacts(uninterrupted.run_id, "launch/job.sbatch",
                                       str(uninterrupted.run_dir / "artifact"))
    text = Path(script).read_text()
    assert text == (uninterrupted.run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --signal=B:USR1@" in text


def _wait(what: str, predicate, slurm, timeout: float = JOB_TIMEOUT_S,
          log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            job_log = log.read_text()[-4000:] if log is not None and log.exists() else ""
            pytest.fail(f"timed out waiting for {what}\n{job_log}\n{slurm.logs()}")
        time.sleep(0.5)


def test_a_preempted_job_checkpoints_requeues_and_resumes_as_the_same_run(
        uninterrupted: Finished, slurm, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    submitted = launch(*slurm_args(slurm, run_dir, mlflow_server))
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted SLURM job (\d+)", submitted.stdout).group(1)
    log = run_dir / f"slurm-{job}.out"
    # Preempt after the first periodic checkpoint and before the next one.
    _wait("step 5", lambda: log.exists() and "step 5/12" in log.read_text(), slurm)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    _wait("the requeue", lambda: slurm.state(job) == "PENDING", slurm)
    stopped_at = committed_step(run_dir)
    # The preemption's own checkpoint (it may coincide with a periodic one), at the first step
    # boundary after the signal reached rank 0; the other rank may get it a little earlier, and
    # the ranks save at the first boundary where either had it.
    said = re.search(r"preemption signal \(it came after step (\d+)\): checkpoint step (\d+) "
                     r"committed", log.read_text())
    assert said is not None, log.read_text()[-3000:]
    arrived, saved = int(said[1]), int(said[2])
    assert saved == stopped_at and arrived >= 5 and arrived <= saved <= arrived + 1, said[0]
    assert stopped_at < 12
    first_run = run_id(run_dir)
    client = MlflowClient(mlflow_server)
    # the preempted attempt closes its run as KILLED; SLURM shows the job PENDING a moment before
    _wait("the preempted attempt's MLflow status",
          lambda: client.get_run(first_run).info.status == "KILLED", slurm, timeout=90, log=log)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip the requeue hold
    _wait("the end", lambda: slurm.state(job) in ("COMPLETED", "FAILED", "GONE"), slurm)
    assert slurm.state(job) == "COMPLETED", log.read_text()[-4000:]

    text = log.read_text()
    assert f"resuming from {run_dir}/checkpoints/step-{stopped_at:08d}.ckpt" in text
    assert "restart 1" in text
    assert committed_step(run_dir) == 12
    assert run_id(run_dir) == first_run  # the requeued job continued the run
    run = client.get_run(first_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["attempt"] == "2"
    assert run.data.tags["slurm.restart_count"] == "1"
    assert losses(client, first_run) == uninterrupted.losses


def test_the_time_limit_warns_by_itself_and_max_requeues_stops_the_requeues(
        slurm, mlflow_server, tmp_path):
    """A 3-minute time limit with a 150 s warning: SLURM itself sends USR1 (nobody else does;
    its time-limit check runs every 30 s, so the warning comes 30 to 60 s in, often before the
    ranks listen), each attempt checkpoints and stops; the first requeues, the second does not
    (cluster.max_requeues=1) and the job ends COMPLETED, not TIMEOUT; the MLflow run (one run for
    both attempts) ends KILLED: it stopped before its last step."""
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    submitted = launch(*slurm_args(slurm, run_dir, mlflow_server), "cluster.time_limit=3",
                       "cluster.preempt_warning_s=150", "cluster.max_requeues=1",
                       "trainer.max_steps=100000", "checkpoint.every_n_steps=0",
                       "trainer.log_every_n_steps=10")
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted SLURM job (\d+)", submitted.stdout).group(1)
    log = run_dir / f"slurm-{job}.out"
    _wait("the requeue", lambda: "Restarts=1 " in slurm.run("scontrol", "show", "job", "-o", job)
          and slurm.state(job) == "PENDING", slurm, timeout=360, log=log)
    first = committed_step(run_dir)
    assert first is not None, log.read_text()[-3000:]
    client = MlflowClient(mlflow_server)
    _wait("the first attempt's MLflow status",
          lambda: client.get_run(run_id(run_dir)).info.status == "KILLED", slurm, timeout=90,
          log=log)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    _wait("the end", lambda: slurm.state(job) in ENDED, slurm, timeout=360, log=log)
    text = log.read_text()
    assert slurm.state(job) == "COMPLETED", text[-4000:]
    assert text.count("USR1: checkpoint and requeue") == 2, text[-4000:]
    assert "requeued (requeue 1 of at most 1)" in text
    assert f"resuming from {run_dir}/checkpoints/step-{first:08d}.ckpt" in text
    assert f"SLURM job {job} was requeued 1 times (cluster.max_requeues=1): not again" in text
    assert committed_step(run_dir) > first
    run = client.get_run(run_id(run_dir))
    assert run.info.status == "KILLED" and run.data.tags["attempt"] == "2"


def test_a_sweep_submits_one_job_per_combination_as_children_of_one_run(
        slurm, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(  # no cluster.partition: sbatch submits to the default one
        [sys.executable, "-m", "trainer", "--multirun", "hydra/launcher=slurm", "cluster=slurm",
         "trainer.max_steps=4", "optim.warmup_steps=1",
         "data.seq_len=64", f"tracking.uri={mlflow_server}", "tracking.experiment=launch-sweep",
         "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = re.findall(r"submitted SLURM job (\d+)", done.stdout)
    assert len(jobs) == 2
    for job in jobs:
        _wait(f"job {job}", lambda job=job: slurm.state(job) in ("COMPLETED", "FAILED", "GONE"),
              slurm)
        assert slurm.state(job) == "COMPLETED"
    client = MlflowClient(mlflow_server)
    children = [client.get_run(run_id(sweep_dir / str(n))) for n in (0, 1)]
    parents = {c.data.tags["mlflow.parentRunId"] for c in children}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["sweep.parent"] == "true"
    assert sorted(float(c.data.params["optim.lr"]) for c in children) == [1e-3, 3e-3]
    assert all(c.info.status == "FINISHED" for c in children)
