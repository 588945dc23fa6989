"""Hydra sweeps onto a cluster: `python -m trainer --multirun hydra/launcher=slurm|eks ...`.

Each job of the sweep is submitted exactly as `python -m launch cluster=<kind> <its overrides>`
would submit it: the same rendered sbatch script or manifest, the same preemption and restart
handling, its own run directory `<sweep dir>/<job number>`, and the sweep directory passed on so
that every job's MLflow run is a child of one parent run. hydra-submitit-launcher was the
alternative; it pickles the task function into a script of its own, one SLURM task per process,
so it would bypass torchrun, the rendered job and the requeue logic, and it has no Kubernetes.
Hydra finds launchers only in the `hydra_plugins` package, hence this module's place.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module outside
# sys.modules, where dataclasses cannot resolve string annotations.
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class ClusterLauncherConf:
    _target_: str = "hydra_plugins.ultramesh_launcher.ultramesh_launcher.ClusterLauncher"
    cluster: str = "slurm"


for _kind in ("slurm", "eks"):
    ConfigStore.instance().store(group="hydra/launcher", name=_kind,
                                 node=ClusterLauncherConf(cluster=_kind), provider="ultramesh")


class ClusterLauncher(Launcher):
    def __init__(self, cluster: str = "slurm") -> None:
        self.cluster = cluster
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        results: list[JobReturn] = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            args = list(overrides)
            if not any(o.startswith("cluster=") for o in args):
                args.insert(0, f"cluster={self.cluster}")
            args += [f"launch.run_dir={sweep_dir / str(num)}", f"launch.sweep_dir={sweep_dir}",
                     f"launch.job_num={num}"]
            print(f"[sweep job {num}] {' '.join(overrides)}", flush=True)
            # A process of its own: Hydra is already initialized in this one, and `launch`
            # composes the config itself, exactly as on the command line.
            rc = subprocess.call([sys.executable, "-m", "launch", *args])
            value: Any = rc if rc == 0 else RuntimeError(f"sweep job {num} was not submitted "
                                                         f"(exit {rc})")
            status = JobStatus.COMPLETED if rc == 0 else JobStatus.FAILED
            results.append(JobReturn(overrides=list(overrides), task_name="train", status=status,
                                     working_dir=str(sweep_dir / str(num)), _return_value=value))
        return results
