"""What must hold before a validated run starts, beyond the config itself: a mesh that works,
a node count this entry point can start, devices this machine can drive, a dataset that exists and
fits the model. Cheap to import (no Lightning), so a refused run costs little time."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from trainer.config import KEY, ConfigError, RunConfig
from trainer.data import dataset_vocab_size
from trainer.plan import ParallelDims, choose
from trainer.xla import XLA_INSTALL_HINT


def check_startable(run: RunConfig) -> ParallelDims:
    """Everything that can refuse a validated run before any process, directory or MLflow run
    exists: the mesh, the node count, this machine's devices, the dataset's index. Returns the
    mesh's dims. `python -m trainer` calls it for every job of its command line before Hydra starts;
    `fit` calls it again for callers that come in without that preflight."""
    dims = choose(run).dims
    in_cluster = "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_JOB_ID" in os.environ
    check_launchable(run, in_cluster=in_cluster)
    check_drivable(run, **_devices_here(run))
    check_xla(run, xla_missing=_xla_missing(run), in_cluster=in_cluster)
    check_dataset(run, vocab_size=dataset_vocab_size(run.data))
    check_pretrained_weights(run)
    return dims


def _devices_here(run: RunConfig) -> dict[str, Any]:
    """The facts `check_drivable` judges: visible GPUs, and why TorchNeuron is missing."""
    neuron_missing = None
    if run.hardware.device_type == "neuron" and run.hardware.backend == "neuron":
        from trainer.mesh import import_torch_neuronx

        try:
            import_torch_neuronx()
        except ImportError as exc:
            neuron_missing = str(exc)
    cuda = torch.cuda.device_count() if run.hardware.device_type == "cuda" else 0
    return {"cuda_devices": cuda, "neuron_missing": neuron_missing}


# The checks take the facts as arguments (gathered above), so each is tested without the
# machine it describes.


def check_launchable(run: RunConfig, *, in_cluster: bool) -> None:
    """What `python -m trainer` itself can start: one node (more go through `launch`)."""
    if run.cluster.nodes > 1 and not in_cluster:
        raise ConfigError(KEY.cluster.nodes, run.cluster.nodes,
                          "a run of several nodes starts through `python -m launch` (SLURM, EKS) "
                          "or torchrun on each node; `python -m trainer` alone runs one node")


def check_drivable(run: RunConfig, *, cuda_devices: int, neuron_missing: str | None) -> None:
    """Whether this machine can drive `run.hardware`: `cuda_devices` GPUs are visible and
    `neuron_missing` says why TorchNeuron cannot be imported (None: it can). Planning needs none
    of this (`python -m trainer.plan` plans a GPU cluster from a laptop); training does."""
    hw = run.hardware
    plan_hint = f"plan it here with `python -m trainer.plan hardware={hw.name}`"
    if hw.device_type == "neuron" and neuron_missing:
        raise ConfigError(KEY.hardware, hw.name, neuron_missing)
    if hw.device_type == "cuda" and cuda_devices == 0:
        raise ConfigError(KEY.hardware, hw.name,
                          "needs CUDA GPUs and torch sees none on this machine; run it on a GPU "
                          f"node (`python -m launch`), or {plan_hint}")
    if hw.device_type == "cuda" and cuda_devices < run.ranks_per_node:
        raise ConfigError(KEY.trainer.devices, run.ranks_per_node,
                          f"this machine has {cuda_devices} CUDA GPU(s); set trainer.devices to "
                          f"at most {cuda_devices}")


def check_pretrained_weights(run: RunConfig) -> None:
    """`model.init_from`'s config and tensors must fit the model (read: config.json and the
    safetensors headers, no weights)."""
    if run.model.init_from and run.uses_family_model:
        from trainer.models.hf import check_pretrained
        from trainer.models.registry import family_of, shape_of

        check_pretrained(family_of(run.model), shape_of(run.model), run.model.init_from,
                         run.model.storage_options)


def _xla_missing(run: RunConfig) -> str | None:
    """Why the XLA path cannot start here (its package is missing), or None. Found without
    importing it: PJRT reads its environment when torch_xla starts, which the strategy sets."""
    if not run.uses_xla:
        return None
    if importlib.util.find_spec("torch_xla") is None:
        return XLA_INSTALL_HINT.format(torch=torch.__version__)
    if run.hardware.device_type == "neuron" and importlib.util.find_spec("torch_neuronx") is None:
        return ("torch-neuronx is not installed: PJRT's NEURON device comes with it, from AWS's "
                "package index (Neuron SDK <= 2.29; docs/hardware/trainium-xla.md)")
    return None


def check_xla(run: RunConfig, *, xla_missing: str | None, in_cluster: bool) -> None:
    """What the XLA path needs beyond its plan (`trainer.plan.xla`): torch_xla, a PJRT device
    it has, and for several ranks torchrun (PJRT takes each process's device from torchrun's
    variables) and a device whose collectives cross processes."""
    if not run.uses_xla:
        return
    hw, where = run.hardware, f"strategy={run.strategy.name} on hardware={run.hardware.name}"
    if hw.device_type == "cuda":
        raise ConfigError(KEY.strategy.name, run.strategy.name,
                          f"{where}: XLA on NVIDIA GPUs needs torch-xla's CUDA plugin, which "
                          "ultramesh does not drive; CUDA trains through the device mesh "
                          "(strategy=auto)")
    if xla_missing:
        raise ConfigError(KEY.strategy.name, run.strategy.name, f"{where}: {xla_missing}")
    if run.world_size > 1 and hw.device_type == "cpu":
        raise ConfigError(KEY.trainer.devices, run.ranks_per_node,
                          f"{where}: XLA's CPU device trains one process only: torch-xla 2.9 "
                          "builds its CPU client without a distributed runtime, so each process "
                          "is a world of its own and an all-reduce returns the local value "
                          "(docs/hardware/trainium-xla.md); use trainer.devices=1, or "
                          "strategy=auto for several CPU ranks")
    if run.world_size > 1 and not in_cluster:
        raise ConfigError(KEY.cluster.kind, run.cluster.kind,
                          f"{where}: several XLA ranks start through torchrun, which sets each "
                          "process's device; use `python -m launch` (cluster=local runs torchrun)")


def check_dataset(run: RunConfig, *, vocab_size: int) -> None:
    """The dataset's token ids (up to `vocab_size` - 1) must all have an embedding."""
    if run.uses_family_model and vocab_size > run.model.vocab_size:
        raise ConfigError(KEY.model.vocab_size, run.model.vocab_size,
                          f"the dataset {run.data.path or 'stdlib'} has token ids up to "
                          f"{vocab_size - 1}; use a vocabulary of at least {vocab_size}")
