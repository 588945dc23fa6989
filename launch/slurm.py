"""cluster=slurm: an sbatch script, submitted with sbatch (chained with afterany when asked)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from launch.job import Job, render, save
from trainer.config import KEY, ConfigError, time_limit_seconds
from trainer.xla import COMPILE_PASS_DIR

FILE_NAME = "job.sbatch"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE")


def check(job: Job) -> None:
    c = job.run.cluster
    if not c.partition:
        raise ConfigError(KEY.cluster.partition, c.partition,
                          "cluster=slurm needs the partition to submit to (sinfo lists them)")
    limit = time_limit_seconds(c.time_limit)
    if c.preempt_warning_s >= limit:
        raise ConfigError(KEY.cluster.preempt_warning_s, c.preempt_warning_s,
                          f"must be shorter than cluster.time_limit={c.time_limit} ({limit} s)")


def log_path(job: Job) -> str:
    return str(job.run_dir / "slurm-%j.out")


def build(job: Job) -> tuple[str, str]:
    c = job.run.cluster
    path = job.run_dir / FILE_NAME
    container = ""
    if c.image:  # pyxis/enroot: the run directory (script, outputs) is shared with the container
        container = f"--container-image={c.image} --container-mounts={job.run_dir}:{job.run_dir} "
    text = render("slurm.sbatch", job=job, time_limit=c.time_limit, partition=c.partition,
                  account=c.account, qos=c.qos, log_path=log_path(job),
                  warning_s=c.preempt_warning_s, max_requeues=c.max_requeues,
                  env=job.env, image=c.image, compile_args=job.compile_pass_args(str(path)),
                  compile_dir=f"{job.run_dir}/{COMPILE_PASS_DIR}",
                  python="python" if c.image else sys.executable, workdir=str(job.workdir),
                  rdzv_port=c.rdzv_port, container_flags=container, script_path=str(path),
                  trainer_args=job.trainer_args(str(path)))
    return FILE_NAME, text


def submit(job: Job, text: str) -> list[str]:
    """Submit the script (`cluster.chain` times, each after the previous one ends); job ids."""
    path = save(job, FILE_NAME, text)
    ids: list[str] = []
    for _ in range(job.run.cluster.chain):
        cmd = ["sbatch", "--parsable"]
        if ids:
            cmd.append(f"--dependency=afterany:{ids[-1]}")
        result = subprocess.run([*cmd, str(path)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        ids.append(result.stdout.strip().split(";")[0])
    return ids


def state(job_id: str) -> str | None:
    """The job's state from scontrol, or None once SLURM has forgotten it."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                            text=True, check=False)
    found = re.search(r"JobState=(\S+)", result.stdout)
    return found.group(1) if found else None


def wait(job_ids: list[str], poll_s: float = 2.0) -> str | None:
    """Block until the last job of the chain has ended; its final state."""
    last = None
    for job_id in job_ids:
        while True:
            last = state(job_id)
            if last is None or last in ENDED:
                break
            time.sleep(poll_s)
    return last
