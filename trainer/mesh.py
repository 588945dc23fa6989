"""The device mesh a `ParallelDims` describes, and the Lightning strategy that owns it.

`MeshStrategy` is Lightning's `ModelParallelStrategy` with the mesh made from the dims: it starts
the process group with the hardware's backend (gloo on CPU, nccl on CUDA, neuron on Trainium), then
`init_device_mesh(device_type, dims.shape, mesh_dim_names=dims.dim_names)` over every mesh dim
(`trainer.config.MESH_DIMS`), and gives it to the LightningModule, whose
`configure_model` lays the model out over it (its family's `parallelize`). Lightning's own
strategy knows two dims only and no replication across FSDP groups (HSDP).

Ranks are laid out row-major, tp fastest: with torchrun's node-major numbering a tp group is tp
consecutive ranks of one node (`trainer/plan/planner.py` explains the order).

TorchNeuron (`torch_neuronx`) is imported only when the hardware is Neuron.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch
from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
from pytorch_lightning.accelerators import Accelerator
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.checkpoint.io import CheckpointIO
from trainer.checkpoint.strategies import SavesThroughDcp
from trainer.hardware import HardwareSpec
from trainer.plan import ParallelDims

log = logging.getLogger(__name__)

NEURON_INSTALL_HINT = (
    "TorchNeuron is not installed: hardware with device_type=neuron needs the torch-neuronx "
    "package built for this torch ({torch}), from AWS's package index: pip install "
    "'torch-neuronx=={minor}.*' --extra-index-url https://pip.repos.neuron.amazonaws.com "
    "(on a Trn2/Trn3 instance with the Neuron driver and runtime; see docs/hardware.md)")


class MeshStrategy(SavesThroughDcp, ModelParallelStrategy):
    """Lightning's model-parallel strategy over the N-D mesh of a `ParallelDims`.

    Checkpoints are torch.distributed.checkpoint directories, one shard per rank, loadable into
    another mesh, written and read by the `CheckpointIO` it is built with, as for every other
    strategy (`SavesThroughDcp`).
    """

    def __init__(self, dims: ParallelDims, hardware: HardwareSpec, checkpoints: CheckpointIO,
                 timeout: timedelta | None = default_pg_timeout):
        super().__init__(process_group_backend=process_group_backend(hardware),
                         save_distributed_checkpoint=True, timeout=timeout)
        self.dims = dims
        self.hardware = hardware
        self.checkpoints = checkpoints

    def setup_environment(self) -> None:
        if self.hardware.device_type == "neuron":
            import_torch_neuronx()  # registers the "neuron" device and process-group backend
        self._setup_distributed()  # Lightning's: device, ranks, init_process_group
        if self.world_size != self.dims.world_size:
            raise RuntimeError(
                f"the mesh {self.dims.mesh_str} needs {self.dims.world_size} ranks, but "
                f"{self.world_size} processes started (cluster.nodes x trainer.devices)")
        self._device_mesh = build_mesh(self.dims, self.hardware.device_type)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh
        if self.global_rank == 0:
            log.info("device mesh %s over %s", self.dims.describe(), self.hardware.device_type)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Batches are split by data-parallel rank only: tensor-parallel peers share a batch."""
        num_replicas, rank = data_parallel_rank(self.device_mesh)
        return {"num_replicas": num_replicas, "rank": rank}


def process_group_backend(hardware: HardwareSpec) -> str:
    """The backend string for `init_process_group`. On Neuron, CPU tensors get gloo beside the
    device's own backend: torch.distributed.checkpoint plans its writes with CPU collectives,
    which the neuron backend alone does not serve (torchtitan builds the same pair)."""
    if hardware.device_type == "neuron":
        return f"neuron:{hardware.backend},cpu:gloo"
    return hardware.backend


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The mesh of `dims` over the default process group, which must already span its world."""
    return init_device_mesh(device_type, dims.shape, mesh_dim_names=dims.dim_names)


def data_parallel_rank(mesh: DeviceMesh) -> tuple[int, int]:
    """(number of data-parallel ranks, this rank's index among them): replicas x shards, with
    the replica index major, so that rank r reads the r-th slice of each global batch."""
    replicate, shard = mesh["dp_replicate"], mesh["dp_shard"]
    rank = replicate.get_local_rank() * shard.size() + shard.get_local_rank()
    return replicate.size() * shard.size(), rank


# ------------------------------------------------------------------------------------------------
# TorchNeuron


def import_torch_neuronx() -> Any:
    """`torch_neuronx`, or an ImportError that says what to install."""
    try:
        import torch_neuronx
    except ImportError as exc:
        version = torch.__version__.split("+")[0]
        minor = ".".join(version.split(".")[:2])
        raise ImportError(NEURON_INSTALL_HINT.format(torch=version, minor=minor)) from exc
    return torch_neuronx


def neuron_accelerator() -> Accelerator:
    """Lightning's accelerator for TorchNeuron's "neuron" device (Trn2/Trn3, one process per
    logical NeuronCore). Raises ImportError with the install command when torch-neuronx is
    missing."""
    import_torch_neuronx()
    return NeuronAccelerator()


class NeuronAccelerator(Accelerator):
    """The "neuron" device through `torch.accelerator`, the device-generic API that TorchNeuron
    implements (it renames PyTorch's PrivateUse1 device to "neuron").

    torch-neuronx maps each process's LOCAL_RANK to one visible NeuronCore unless
    NEURON_RT_VISIBLE_CORES is set; a process that sees a single core addresses it as neuron:0.
    """

    def setup_device(self, device: torch.device) -> None:
        if device.type != "neuron":
            raise RuntimeError(f"NeuronAccelerator got device {device}")
        torch.accelerator.set_device_index(device.index or 0)

    def teardown(self) -> None:
        pass

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return {}

    @staticmethod
    def parse_devices(devices: Any) -> int:
        if devices in ("auto", -1, None):
            return NeuronAccelerator.auto_device_count()
        return int(devices)

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        count = int(devices)
        if torch.accelerator.device_count() == 1:
            return [torch.device("neuron", 0)] * count  # one core per process, each its own
        return [torch.device("neuron", i) for i in range(count)]

    @staticmethod
    def auto_device_count() -> int:
        return torch.accelerator.device_count()

    @staticmethod
    def is_available() -> bool:
        current = torch.accelerator.current_accelerator()
        return current is not None and current.type == "neuron"

    @staticmethod
    def name() -> str:
        return "neuron"
