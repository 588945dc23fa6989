"""What must hold before a validated run starts, beyond the config itself: a mesh that works,
a node count this entry point can start, devices this machine can drive, a dataset that exists and
fits the model. Cheap to import (no Lightning), so a refused run costs little time."""

from __future__ import annotations

import os
from typing import Any

import torch

from trainer import config
from trainer.config import RunConfig
from trainer.data import dataset_vocab_size
from trainer.plan import MeshPlan, plan


def check_startable(run: RunConfig) -> MeshPlan:
    """Everything that can refuse a validated run before any process, directory or MLflow run
    exists: the mesh, the node count, this machine's devices, the dataset's index. Returns the
    plan. `python -m trainer` calls it for every job of its command line before Hydra starts;
    `fit` calls it again for callers that come in without that preflight."""
    mesh_plan = plan(run)
    in_cluster = "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_JOB_ID" in os.environ
    config.check_launchable(run, in_cluster=in_cluster)
    config.check_drivable(run, **_devices_here(run))
    config.check_dataset(run, vocab_size=dataset_vocab_size(run.data))
    return mesh_plan


def _devices_here(run: RunConfig) -> dict[str, Any]:
    """The facts `config.check_drivable` judges: visible GPUs, and why TorchNeuron is missing."""
    neuron_missing = None
    if run.hardware.device_type == "neuron" and run.hardware.backend == "neuron":
        from trainer.mesh import import_torch_neuronx

        try:
            import_torch_neuronx()
        except ImportError as exc:
            neuron_missing = str(exc)
    cuda = torch.cuda.device_count() if run.hardware.device_type == "cuda" else 0
    return {"cuda_devices": cuda, "neuron_missing": neuron_missing}
