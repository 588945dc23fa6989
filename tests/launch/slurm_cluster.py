"""A real two-node SLURM cluster on this machine (Debian's slurm-wlm 22.05, `make system-deps`).

munged, slurmctld and two slurmd "nodes" (n1, n2) share this host: same address, distinct ports,
`%n` in every per-node path (NOTES.md, "Two SLURM nodes on one host"). Started once per session;
commands find it through SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, require

START_TIMEOUT_S = 60
PARTITION = "debug"

SLURM_CONF = """\
ClusterName=ultramesh-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdSpoolDir={root}/spool-%n
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port1} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port2} CPUs=1 State=UNKNOWN
PartitionName={partition} Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


@dataclass(frozen=True)
class Slurm:
    conf: Path
    root: Path
    partition: str

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(list(args), capture_output=True, text=True, check=False,
                                env={**os.environ, "SLURM_CONF": str(self.conf)})
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "GONE"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted(self.root.glob("*.log")))


def _munge_running() -> bool:
    return subprocess.run(["munge", "-n"], capture_output=True, check=False).returncode == 0


def start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    """Start the daemons, yield the cluster once both nodes are idle, stop them afterwards.
    For a session fixture (`yield from start(...)`)."""
    for exe in ("slurmctld", "slurmd", "munged", "sbatch"):
        if shutil.which(exe) is None and not Path(f"/usr/sbin/{exe}").exists():
            require("SLURM", f"{exe} not found (make system-deps installs slurm-wlm and munge)")
    if os.geteuid() != 0:
        require("SLURM", "the test cluster's slurmd must run as root")
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=free_port(), port1=free_port(),
                                      port2=free_port(), partition=PARTITION))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started: list[subprocess.Popen] = []
    if not _munge_running():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=False)
    daemons = [["/usr/sbin/slurmctld", "-D", "-c", "-i", "-f", str(conf)],
               ["/usr/sbin/slurmd", "-D", "-N", "n1", "-f", str(conf)],
               ["/usr/sbin/slurmd", "-D", "-N", "n2", "-f", str(conf)]]
    cluster = Slurm(conf, root, PARTITION)
    try:
        for cmd in daemons:
            with open(root / f"{Path(cmd[0]).name}-{cmd[3] if 'slurmd' in cmd[0] else 'ctl'}.out",
                      "wb") as out:
                started.append(subprocess.Popen(cmd, env=env, stdout=out,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True))
            time.sleep(0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            idle = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).split("\n")
            if sum(line.endswith("idle") for line in idle) == 2:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                message = f"SLURM did not start: sinfo says {idle}\n{cluster.logs()}"
                if os.environ.get("CI") == "true":
                    pytest.fail(message)
                pytest.skip(message)
            time.sleep(0.5)
        os.environ["SLURM_CONF"] = str(conf)  # for the launcher's own sbatch/scontrol calls
        yield cluster
    finally:
        if started and started[0].poll() is None:  # jobs a failed test left: their steps go too
            jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                cluster.run("scancel", "--full", *jobs, check=False)
                deadline = time.monotonic() + 30
                while cluster.run("squeue", "-h", check=False).strip() and \
                        time.monotonic() < deadline:
                    time.sleep(0.5)
        os.environ.pop("SLURM_CONF", None)
        for proc in reversed(started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
