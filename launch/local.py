"""cluster=local: torchrun on this machine, restarting the group from the newest checkpoint."""

from __future__ import annotations

import subprocess
import sys

from launch.job import Job, render, save
from trainer.config import ConfigError

FILE_NAME = "launch.sh"


def check(job: Job) -> None:
    if job.nodes != 1:
        raise ConfigError("cluster.nodes", job.nodes,
                          "cluster=local runs on this machine only (1 node); several nodes go "
                          "through cluster=slurm or cluster=eks")


def build(job: Job) -> tuple[str, str]:
    path = job.run_dir / FILE_NAME
    text = render("local.sh", job=job, python=sys.executable, workdir=str(job.workdir),
                  env=job.env,
                  max_restarts=job.run.launch.max_restarts,
                  trainer_args=job.trainer_args(str(path)))
    return FILE_NAME, text


def submit(job: Job, text: str) -> int:
    path = save(job, FILE_NAME, text)
    print(f"running {path} (torchrun, {job.ranks_per_node} rank(s), "
          f"--max-restarts={job.run.launch.max_restarts}); outputs in {job.run_dir}", flush=True)
    return subprocess.call(["bash", str(path)])
