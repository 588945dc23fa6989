"""`LanguageModel`: the LightningModule that trains a model family's decoder on next tokens."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from trainer.config import KEY, LOW_PRECISION_FORMATS, PRECISION_AUTO, RunConfig, locate
from trainer.models.low_precision import LowPrecision, after_optimizer_step
from trainer.models.parallel import compile_backend
from trainer.models.registry import family_of, shape_of
from trainer.optim import build_optimizer, build_scheduler, clip_grad_norm
from trainer.plan import ParallelDims

log = logging.getLogger(__name__)


class LanguageModel(pl.LightningModule):
    """Builds the family's model in `configure_model`, born sharded: constructed on the meta
    device, laid out over the device mesh (`self.device_mesh`, set by the mesh strategy before
    that hook runs), then each rank allocates and fills only its own shards: from the seed, or
    from a Hugging Face checkpoint (`model.init_from`)."""

    def __init__(self, run: RunConfig, dims: ParallelDims):
        super().__init__()
        self.run = run
        self.dims = dims
        self.family = family_of(run.model)
        self.args = shape_of(run.model)
        self.model: torch.nn.Module | None = None
        self.low_precision = LowPrecision.of(run, fsdp=dims.fsdp)
        self.pretrained: dict[str, float] | None = None  # what loading `model.init_from` took
        # Read by the step monitor: kept on the device so logging never forces a sync per step.
        self.last_grad_norm: torch.Tensor | None = None

    def flops_per_token(self, seq_len: int) -> float:
        return self.args.flops_per_token(seq_len)

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this again, e.g. when resuming
            return
        # Lightning calls this hook inside `with <its device>:` and the precision plugin's dtype
        # context, so the default device is where the shards belong and the default dtype is the
        # parameters' (bf16 under "bf16-true").
        device = torch.get_default_device()
        with torch.device("meta"):
            model = self.family.build(self.args)
        mesh = self.device_mesh
        if self.dims.uses_mesh and mesh is None:  # never train unsharded what the dims shard
            raise RuntimeError(f"the mesh {self.dims.describe()} shards the model, but no device "
                               f"mesh was handed to the module (a mesh strategy sets it before "
                               f"configure_model)")
        self.family.parallelize(model, mesh if self.dims.uses_mesh else None, self.dims,
                                self.run.parallelism, backend=compile_backend(device.type),
                                low_precision=self.low_precision)
        model.to_empty(device=device)
        self.family.init_weights(model, self.run.seed, device)
        if self.run.model.init_from and device.type != "meta":  # meta: a validation's build
            self.pretrained = self._load_pretrained(model)
        self.model = model

    def _load_pretrained(self, model: torch.nn.Module) -> dict[str, float]:
        """Fill this rank's shards from `model.init_from`; what it read and the memory it took
        beyond the shards, logged by rank 0 and kept for whoever asks."""
        import time

        from trainer.models.hf import load_pretrained
        from trainer.monitor import PeakMemory

        start = time.perf_counter()
        with PeakMemory() as peak:
            report = load_pretrained(model, self.family, self.args, self.run.model.init_from,
                                     self.run.model.storage_options)
        figures = {"tensors": report.tensors, "read_bytes": report.bytes_read,
                   "shard_bytes": report.local_bytes, "seconds": time.perf_counter() - start,
                   "peak_beyond_bytes": peak.beyond if peak.beyond is not None else -1}
        ranks = [figures]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [{}] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, figures)
        if self.global_rank == 0:
            worst = max(ranks, key=lambda r: r["peak_beyond_bytes"] + r["shard_bytes"])
            memory = (f"peak memory +{worst['peak_beyond_bytes'] / 2**20:.1f} MiB while loading"
                      if worst["peak_beyond_bytes"] >= 0 else "peak memory not measured here")
            log.info("loaded %d tensors from %s in %.1f s; the rank holding most read %.1f MiB "
                     "for %.1f MiB of shards, %s", report.tensors, self.run.model.init_from,
                     max(r["seconds"] for r in ranks), worst["read_bytes"] / 2**20,
                     worst["shard_bytes"] / 2**20, memory)
        return figures

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int):
        loss = self._loss(batch)
        # a family's model may add a loss of its own (MoE: load balancing); evaluation leaves it out
        auxiliary = getattr(self.model, "auxiliary_loss", None)
        extra = auxiliary() if auxiliary is not None else None
        return loss if extra is None else loss + extra

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int):
        return self._loss(batch)

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # (inputs, targets), or with document masking (inputs, targets, documents)
        inputs, targets, *documents = batch
        logits = self.model(inputs, *documents)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        after = getattr(self.model, "after_optimizer_step", None)  # MoE: the balance bias
        if after is not None:
            after()

    def step_metrics(self) -> dict[str, torch.Tensor]:
        """The model's own metrics (MoE: router health) as device tensors, read by the step
        monitor at its log cadence on every rank."""
        metrics = getattr(self.model, "router_metrics", None)
        return metrics() if metrics is not None else {}

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.run.optim)
        scheduler = build_scheduler(optimizer, self.run.optim, self.run.trainer.max_steps)
        if self.low_precision is not None:
            optimizer.register_step_post_hook(
                lambda *_: after_optimizer_step(self.model, self.low_precision))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        # Lightning's own clipping stacks norms across meshes, which fails under tensor parallel;
        # ours is mesh-aware and also measures the norm the monitor logs.
        self.last_grad_norm = clip_grad_norm(self.model.parameters(), self.run.optim.grad_clip)


def build_module(run: RunConfig, dims: ParallelDims) -> pl.LightningModule:
    """The family model's module, or the user's `model._target_` built from `model.kwargs`.
    The trainer and the plan validation both build it here."""
    if run.uses_family_model:
        return LanguageModel(run, dims)
    return locate(run.model._target_)(**run.model.kwargs)


def precision_plugin(run: RunConfig, device_type: str | None = None) -> Any:
    """Lightning's precision plugin for trainer.precision, built here rather than by Lightning so
    that the plan validation runs the model under the very same contexts, and because Lightning
    builds autocast for "cuda" whenever the accelerator is an object, as the Neuron one is (the
    device is named here; untested on Neuron: no Trainium here). `device_type` overrides the
    hardware's, for a validation that runs on the CPU what will run elsewhere."""
    from pytorch_lightning.plugins.precision import HalfPrecision, MixedPrecision, Precision

    precision = run.trainer.precision
    if precision == PRECISION_AUTO:
        raise ValueError(f"{KEY.trainer.precision}=auto must be resolved by the planner first "
                         "(trainer.plan.resolve_precision)")
    if precision in LOW_PRECISION_FORMATS:  # the converted matmuls aside, as bf16-mixed
        precision = "bf16-mixed"
    if precision.endswith("-mixed"):
        device = device_type or run.hardware.device_type
        return MixedPrecision(precision, device=device)  # type: ignore[arg-type]
    if precision.endswith("-true") and precision != "32-true":
        return HalfPrecision(precision)  # type: ignore[arg-type]
    return Precision()
