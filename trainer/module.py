"""`LanguageModel`: the LightningModule that trains the reference decoder on next tokens."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from trainer.config import RunConfig
from trainer.models.llama import ModelArgs, Transformer, flops_per_token
from trainer.optim import build_optimizer, build_scheduler, clip_grad_norm


class LanguageModel(pl.LightningModule):
    """Builds the decoder in `configure_model`, so a sharding strategy can lay it out over its
    device mesh first (`self.device_mesh` is set by the mesh strategy before that hook runs)."""

    def __init__(self, run: RunConfig):
        super().__init__()
        self.run = run
        self.args = ModelArgs.from_config(run.model)
        self.model: Transformer | None = None
        # Read by the step monitor: kept on the device so logging never forces a sync per step.
        self.last_grad_norm: torch.Tensor | None = None

    def flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.args, seq_len)

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this again, e.g. when resuming
            return
        # Every rank draws the same initial weights: parameters that tensor parallel does not split
        # would otherwise start different on each TP rank and silently diverge.
        torch.manual_seed(self.run.seed)
        model = Transformer(self.args)
        mesh = self._mesh()
        if mesh is not None:
            from trainer.models.parallelize import parallelize

            parallelize(model, mesh, self.run.parallelism, precision=self.run.trainer.precision)
        self.model = model

    def _mesh(self):
        try:
            return self.device_mesh
        except (AttributeError, RuntimeError):  # no mesh strategy (DDP or a single process)
            return None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
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
