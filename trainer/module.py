"""`LanguageModel`: the LightningModule that trains the reference decoder on next tokens."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from trainer.config import RunConfig, locate
from trainer.models.llama import ModelArgs, Transformer, flops_per_token
from trainer.models.parallelize import COMPILE_BACKENDS, parallelize
from trainer.optim import build_optimizer, build_scheduler, clip_grad_norm
from trainer.plan import MeshPlan


class LanguageModel(pl.LightningModule):
    """Builds the decoder in `configure_model`, born sharded: constructed on the meta device,
    laid out over the plan's device mesh (`self.device_mesh`, set by the mesh strategy before
    that hook runs), then each rank allocates and initialises only its own shards."""

    def __init__(self, run: RunConfig, plan: MeshPlan):
        super().__init__()
        self.run = run
        self.plan = plan
        self.args = ModelArgs.from_config(run.model)
        self.model: Transformer | None = None
        # Read by the step monitor: kept on the device so logging never forces a sync per step.
        self.last_grad_norm: torch.Tensor | None = None

    def flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.args, seq_len)

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this again, e.g. when resuming
            return
        # Lightning calls this hook inside `with <its device>:` and the precision plugin's dtype
        # context, so the default device is where the shards belong and the default dtype is the
        # parameters' (bf16 under "bf16-true").
        device = torch.get_default_device()
        with torch.device("meta"):
            model = Transformer(self.args)
        mesh = self.device_mesh
        if self.plan.uses_mesh and mesh is None:  # never train unsharded what the plan shards
            raise RuntimeError(f"the plan {self.plan.describe()} shards the model, but no device "
                               f"mesh was handed to the module (a mesh strategy sets it before "
                               f"configure_model)")
        parallelize(model, mesh if self.plan.uses_mesh else None, self.plan,
                    self.run.parallelism, precision=self.run.trainer.precision,
                    compile_backend=_compile_backend(device))
        model.to_empty(device=device)
        model.init_weights(seed=self.run.seed, buffer_device=device)
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        return self._loss(batch)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        return self._loss(batch)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.run.optim)
        scheduler = build_scheduler(optimizer, self.run.optim, self.run.trainer.max_steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        # Lightning's own clipping stacks norms across meshes, which fails under tensor parallel;
        # ours is mesh-aware and also measures the norm the monitor logs.
        self.last_grad_norm = clip_grad_norm(self.model.parameters(), self.run.optim.grad_clip)


def build_module(run: RunConfig, plan: MeshPlan) -> pl.LightningModule:
    """The reference decoder's module, or the user's `model._target_` built from `model.kwargs`.
    The trainer and the plan validation both build it here."""
    if run.uses_reference_model:
        return LanguageModel(run, plan)
    return locate(run.model._target_)(**run.model.kwargs)


def precision_plugin(run: RunConfig, device_type: str | None = None) -> Any:
    """Lightning's precision plugin for trainer.precision, built here rather than by Lightning so
    that the plan validation runs the model under the very same contexts, and because Lightning
    builds autocast for "cuda" whenever the accelerator is an object, as the Neuron one is (the
    device is named here; untested on Neuron: no Trainium here). `device_type` overrides the
    hardware's, for a validation that runs on the CPU what will run elsewhere."""
    from pytorch_lightning.plugins.precision import HalfPrecision, MixedPrecision, Precision

    precision = run.trainer.precision
    if precision.endswith("-mixed"):
        device = device_type or run.hardware.device_type
        return MixedPrecision(precision, device=device)  # type: ignore[arg-type]
    if precision.endswith("-true") and precision != "32-true":
        return HalfPrecision(precision)  # type: ignore[arg-type]
    return Precision()


def _compile_backend(device: torch.device) -> str:
    return COMPILE_BACKENDS.get(device.type, "inductor")
