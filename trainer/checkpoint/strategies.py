"""Lightning's one-process and DDP strategies with their checkpoints through `CheckpointIO`, as the
mesh strategy's are (`trainer.mesh.MeshStrategy` shares `SavesThroughDcp`): every rank takes part
in a save (DCP writes each rank's share), and state is restored after `setup`, into the
optimizers Lightning has built by then."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

from trainer.checkpoint.io import CheckpointIO


class SavesThroughDcp:
    """A strategy whose checkpoints go through the `CheckpointIO` it was built with
    (`self.checkpoints`), for Lightning's own save and load calls."""

    checkpoints: CheckpointIO
    restore_checkpoint_after_setup = True  # the optimizers must exist to load into them

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any | None = None) -> None:
        rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        result = self.checkpoints.save(self.lightning_module, self.optimizers, rest, str(filepath),
                                       int(checkpoint.get("global_step", 0)), blocking=True).wait()
        if not result.ok:
            raise RuntimeError(f"checkpoint {filepath} was not saved: {result.error}")

    def load_checkpoint(self, checkpoint_path: Any,
                        weights_only: bool | None = None) -> dict[str, Any]:
        module = self.lightning_module
        return self.checkpoints.load(module, self.optimizers, str(checkpoint_path),
                                     strict=getattr(module, "strict_loading", True))

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass  # loaded in place by load_checkpoint

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pass  # loaded in place by load_checkpoint


class SingleProcess(SavesThroughDcp, SingleDeviceStrategy):
    def __init__(self, checkpoints: CheckpointIO, device_type: str):
        super().__init__(device=torch.device(device_type, 0) if device_type != "cpu" else "cpu")
        self.checkpoints = checkpoints


class DataParallel(SavesThroughDcp, DDPStrategy):
    def __init__(self, checkpoints: CheckpointIO, backend: str):
        super().__init__(process_group_backend=backend)
        self.checkpoints = checkpoints
