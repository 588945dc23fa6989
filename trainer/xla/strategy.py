"""Lightning on PyTorch/XLA devices that are not TPUs: the accelerator, the one-process and
data-parallel strategies, and the device loader.

Lightning's own `XLAAccelerator` probes for TPUs only (its Trainium issues #15172 and #19826 are
open) and its `XLAStrategy` launches through `xmp.spawn` with its own checkpoint format. Here the
device is whatever PJRT is set to (`trainer.xla.runtime_env`: NEURON on Trainium, CPU in tests),
one process per device started by torchrun, and checkpoints go through `trainer.checkpoint` like
every other strategy's.

A step on XLA is traced lazily and runs when it is cut: the device loader cuts at each batch
(`torch_xla`'s parallel loader marks the step when it hands one out) and `optimizer_step` cuts
after the update (`torch_xla.sync()`), so one compiled graph holds forward, backward, the gradient
all-reduce and the optimizer, and the same graph serves every step.

torch_xla is imported inside the functions: this module loads without it (the import graph test).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning_fabric.utilities.distributed import _init_dist_connection
from pytorch_lightning.accelerators import Accelerator
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy, Strategy

from trainer.checkpoint.io import CheckpointIO
from trainer.checkpoint.strategies import SavesThroughDcp
from trainer.config import RunConfig
from trainer.plan import ParallelDims
from trainer.xla import XLA_INSTALL_HINT, runtime_env

log = logging.getLogger(__name__)



def import_torch_xla() -> Any:
    """`torch_xla`, or an ImportError that says what to install."""
    try:
        import torch_xla
    except ImportError as exc:
        raise ImportError(XLA_INSTALL_HINT.format(torch=torch.__version__)) from exc
    return torch_xla


def build_strategy(run: RunConfig, dims: ParallelDims, checkpoints: CheckpointIO) -> Strategy:
    """The XLA strategy for `dims` (one process, or whole-model replicas: `trainer.plan.xla`
    refuses the rest), saving through `checkpoints`. The runtime environment is set first,
    before torch_xla starts PJRT; variables the launcher exported win."""
    for name, value in runtime_env(run).items():
        os.environ.setdefault(name, value)
    import_torch_xla()
    if dims.world_size == 1:
        return XlaSingleDevice(checkpoints)
    return XlaDataParallel(checkpoints)


class XlaAccelerator(Accelerator):
    """Any PJRT device, one per process: the process's `torch_xla.device()`. PJRT chooses which
    physical device that is (on Neuron, torch-neuronx maps LOCAL_RANK to a NeuronCore)."""

    def setup_device(self, device: torch.device) -> None:
        pass  # PJRT has bound this process to its device

    def teardown(self) -> None:
        pass

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return {}

    @staticmethod
    def parse_devices(devices: Any) -> int:
        return 1 if devices in ("auto", -1, None) else int(devices)

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device("xla", i) for i in range(int(devices))]

    @staticmethod
    def auto_device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        try:
            import_torch_xla()
        except ImportError:
            return False
        return True

    @staticmethod
    def name() -> str:
        return "xla_pjrt"


class _XlaSteps(SavesThroughDcp):
    """What both XLA strategies share: the device, the loader, the step boundary, checkpoints
    through `trainer.checkpoint` (DCP copies XLA tensors to the host as it writes them)."""

    @property
    def root_device(self) -> torch.device:
        return import_torch_xla().device()

    def model_to_device(self) -> None:
        assert self.model is not None  # type: ignore[attr-defined]
        self.model.to(self.root_device)  # type: ignore[attr-defined]

    def process_dataloader(self, dataloader: Any) -> Any:
        if isinstance(dataloader, DeviceLoader):
            return dataloader
        if hasattr(dataloader, "load_state_dict"):  # the trainer's TokenLoader: keeps position
            return DeviceLoader(dataloader, self.root_device)
        from torch_xla.distributed.parallel_loader import MpDeviceLoader

        return MpDeviceLoader(dataloader, self.root_device)  # a user's loader

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Make every replica's gradients their mean (nothing to do for one process)."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any],
                       model: Any = None, **kwargs: Any) -> Any:
        """Gradients are reduced between backward and clipping (which needs the mean's norm), then
        the step is cut: the update runs with the graph that computed it."""

        def reduced() -> Any:
            result = closure()
            self.reduce_gradients(optimizer)
            return result

        output = super().optimizer_step(optimizer, reduced, model, **kwargs)  # type: ignore[misc]
        import_torch_xla().sync()
        return output

    def load_checkpoint(self, checkpoint_path: Any,
                        weights_only: bool | None = None) -> dict[str, Any]:
        state = super().load_checkpoint(checkpoint_path, weights_only)
        import_torch_xla().sync()  # the loaded weights land before the first step is traced
        return state

    def teardown(self) -> None:
        log_compilations()
        super().teardown()  # type: ignore[misc]


class XlaSingleDevice(_XlaSteps, SingleDeviceStrategy):
    def __init__(self, checkpoints: CheckpointIO) -> None:
        super().__init__(device="cpu")  # a placeholder: root_device is PJRT's device
        self.checkpoints = checkpoints


class XlaDataParallel(_XlaSteps, DDPStrategy):
    """Whole-model replicas over the `xla` process group: no DDP wrapper (XLA traces the
    all-reduce into the step's graph instead of hooking backward). Every replica starts from the
    same weights without a broadcast: `trainer.models.init` draws them from the seed alone."""

    def __init__(self, checkpoints: CheckpointIO,
                 timeout: timedelta | None = default_pg_timeout):
        super().__init__(process_group_backend="xla", timeout=timeout)
        self.checkpoints = checkpoints

    def setup_distributed(self) -> None:
        import_torch_xla()
        import torch_xla.distributed.xla_backend  # noqa: F401  registers the "xla" backend

        self.set_world_ranks()
        # no device_id: init_process_group binds CUDA-like devices by it, which XLA's are not
        _init_dist_connection(self.cluster_environment, "xla", timeout=self._timeout)

    def configure_ddp(self) -> None:
        pass

    def determine_ddp_device_ids(self) -> list[int] | None:
        return None

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        import torch_xla.core.xla_model as xm

        xm.reduce_gradients(optimizer)

    def barrier(self, name: str | None = None, *args: Any, **kwargs: Any) -> None:
        import torch_xla.core.xla_model as xm

        xm.rendezvous(name or "barrier")


class DeviceLoader:
    """The rank's batches (`trainer.data.sampler.TokenLoader`) through torch_xla's parallel
    loader, which copies them to the device in background threads and marks the step as it hands
    each one out.

    The loader reads ahead of training, so its own position runs ahead of the step. The position
    this wrapper reports (and Lightning checkpoints) counts only the batches it has handed out:
    a resumed run starts at the first batch the saved run had not trained on.
    """

    def __init__(self, loader: Any, device: torch.device):
        self.loader, self.device = loader, device
        self._state: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        from torch_xla.distributed.parallel_loader import ParallelLoader

        if self._state is not None:  # rewind what the last iteration read ahead
            self.loader.load_state_dict(self._state)
        batches = iter(self.loader)  # a new epoch starts here, if the last one is used up
        state = self._state = self.loader.state_dict()
        for batch in ParallelLoader(batches, [self.device]).per_device_loader(self.device):
            state["batches_consumed"] += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state) if self._state is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()


def log_compilations() -> None:
    """How many graphs XLA compiled and ran in this process: a number that grows with the steps
    means something in the step changes shape or constant each time and recompiles (the usual
    cause of a slow XLA run; PT_XLA_DEBUG_LEVEL=1 says which)."""
    import torch_xla.debug.metrics as met

    compiled = (met.metric_data("CompileTime") or (0,))[0]
    executed = (met.metric_data("ExecuteTime") or (0,))[0]
    log.info("XLA compiled %d graph(s) and ran %d", compiled, executed)
