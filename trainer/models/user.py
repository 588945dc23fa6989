"""A user's own LightningModule (`model._target_`), planned as itself.

The planner counts its parameters from its own build on the meta device (the constructor, and the
`configure_model` hook when the module has one and the constructor left it empty), so memory is
planned for the model that trains, not for a family's shape. How it shards is its own business:
- a module without `configure_model` cannot be born sharded and trains as data-parallel replicas
  (DDP); the planner refuses a mesh for it;
- a module with `configure_model` gets the device mesh there and shards itself; the planner counts
  its parameters as FSDP-sharded over the data-parallel dims (it cannot see a tensor-parallel plan).
What neither build shows (activations) is left to `plan.validate=true`, whose fake training step
measures them; a module that cannot be built on the meta device cannot be planned by `auto`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from trainer.config import KEY, ConfigError, locate
from trainer.models.family import ParamCounts, ParamGroup, Widths


@dataclass(frozen=True)
class UserModuleCosts:
    """A user's module as the planner sees it: a parameter count and whether it shards itself.
    Activations and traffic are unknown (0): `estimates_activations` says so."""

    target: str
    params: int
    shards_itself: bool
    uncounted: str | None = None  # why the meta build failed (params is then 0)
    vocab_size: int = 0
    estimates_activations: bool = False

    def param_counts(self) -> ParamCounts:
        return ParamCounts((ParamGroup("module", self.params, matmul=True),))

    def flops_per_token(self, seq_len: int) -> float:
        """6N: one multiply-add per weight and token forward, two backward (attention's own
        FLOPs are not visible from a parameter count)."""
        return 6.0 * self.params

    def activation_bytes_per_token(self, w: Widths, *, tp: int, sequence_parallel: bool,
                                   checkpointing: bool) -> float:
        return 0.0

    def tp_bytes_per_token(self, w: Widths, *, tp: int, checkpointing: bool) -> float:
        return 0.0

    def tp_rejection(self, tp: int) -> tuple[str, int, str] | None:
        return None

    def auto_refusal(self) -> ConfigError | None:
        """Why `parallelism=auto` cannot plan this module: it could not be counted."""
        if self.uncounted is None:
            return None
        return ConfigError(KEY.parallelism, "auto",
                           f"{KEY.model._target_}={self.target} cannot be built on the meta "
                           f"device to count its parameters ({self.uncounted}), and auto plans "
                           "from that count; choose the parallelism explicitly (e.g. "
                           "parallelism=ddp)")

    def mesh_rejection(self, uses_mesh: bool) -> str | None:
        """Why a mesh (anything beyond whole-model replicas) cannot train this module."""
        if uses_mesh and not self.shards_itself:
            return (f"{KEY.model._target_}={self.target} has no configure_model hook, so it "
                    "cannot be sharded: it trains as data-parallel replicas (parallelism=ddp, "
                    "or auto)")
        return None


def user_module_costs(target: str, kwargs: dict[str, Any]) -> UserModuleCosts:
    """The module `target` built from `kwargs` on the meta device, counted; `uncounted` says why
    when it cannot be built there."""
    return _counted(target, json.dumps(kwargs, sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _counted(target: str, kwargs_json: str) -> UserModuleCosts:
    import pytorch_lightning as pl
    import torch

    cls = locate(target)
    shards_itself = cls.configure_model is not pl.LightningModule.configure_model
    try:
        with torch.device("meta"):
            module = cls(**json.loads(kwargs_json))
            params = _count(module)
            if params == 0 and shards_itself:
                module.configure_model()
                params = _count(module)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return UserModuleCosts(target, 0, shards_itself, uncounted=f"{type(exc).__name__}: {first}")
    return UserModuleCosts(target, params, shards_itself)


def _count(module: Any) -> int:
    # DTensor parameters report their global shape: a module that shards itself counts whole
    return sum(p.numel() for p in module.parameters())
