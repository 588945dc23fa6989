"""Lightning's one-process and DDP strategies with their checkpoints through `CheckpointIO`, as the
mesh strategy's are: every rank takes part in a save (DCP writes each rank's share), and state is
restored after `setup`, into the optimizers Lightning has built by then."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy, Strategy

from trainer.checkpoint.io import CheckpointIO


class _DcpCheckpoints:
    restore_checkpoint_after_setup = True  # the optimizers must exist to load into them

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any | None = None) -> None:
        self.checkpoint_io.save_checkpoint(checkpoint, filepath)  # type: ignore[attr-defined]

    def load_checkpoint(self, checkpoint_path: Any,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return self.checkpoint_io.load_checkpoint(checkpoint_path)  # type: ignore[attr-defined]

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass  # loaded in place by load_checkpoint

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pass  # loaded in place by load_checkpoint


class SingleProcess(_DcpCheckpoints, SingleDeviceStrategy):
    pass


class DataParallel(_DcpCheckpoints, DDPStrategy):
    pass


def single_process(device_type: str) -> SingleProcess:
    return SingleProcess(device=torch.device(device_type, 0) if device_type != "cpu" else "cpu")


def data_parallel(backend: str) -> DataParallel:
    return DataParallel(process_group_backend=backend)


def attach(strategy: Strategy, io: CheckpointIO) -> Strategy:
    """Give `strategy` the checkpoint IO, and the IO the strategy it reads state from."""
    strategy.checkpoint_io = io
    io.strategy = strategy
    return strategy


def checkpoint_io_of(strategy: Strategy, storage_options: dict[str, Any] | None) -> CheckpointIO:
    """The strategy's `CheckpointIO`; one is made (and attached) if it has Lightning's default."""
    io = strategy.checkpoint_io
    if not isinstance(io, CheckpointIO):
        io = CheckpointIO(storage_options)
        attach(strategy, io)
    return io
