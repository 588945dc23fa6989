"""AdamW, the warmup + cosine schedule, and gradient clipping that works on sharded parameters."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from trainer.config import OptimConfig

# DTensors on meshes of more dims than this take per-tensor kernels instead of foreach ones:
# torch 2.13 works out a foreach op's sharding tensor by tensor over every combination of the
# mesh's dims, uncached; for an MoE's experts on (dp_replicate, dp_shard_mod_ep, ep, tp) that
# took 0.8 s per tensor and op here (hours for a 94-layer model's first step), while a plain
# op's sharding is cached per spec and every layer's experts share theirs.
FOREACH_MAX_MESH_DIMS = 2


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: decaying norm gains pulls them towards zero,
    which only hurts. Parameters are grouped by kind as well: a foreach kernel takes DTensors or
    plain tensors, not both (tensor parallel without FSDP leaves an MoE router plain), and
    DTensors on meshes of more than FOREACH_MAX_MESH_DIMS dims go per tensor."""
    groups: dict[tuple[bool, bool, bool | None], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            kind = (param.ndim >= 2, isinstance(param, torch.distributed.tensor.DTensor),
                    _foreach(param))
            groups.setdefault(kind, []).append(param)
    # foreach keeps the update to a handful of kernels; fused is not implemented for DTensor.
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
          "foreach": foreach}
         for (decay, _, foreach), params in sorted(groups.items(), key=_group_order)],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def _foreach(tensor: torch.Tensor) -> bool | None:
    """False: per tensor (a DTensor on a large mesh); None: torch's own choice, which is foreach
    only on devices that have the kernels (not XLA, whose tensors refuse foreach=True)."""
    mesh = _mesh_of(tensor)
    return False if mesh is not None and mesh.ndim > FOREACH_MAX_MESH_DIMS else None


def _group_order(item: tuple[tuple[bool, bool, bool | None], list]) -> tuple[bool, ...]:
    (decay, dtensor, foreach), _ = item
    return (not decay, not dtensor, foreach is False)  # decayed matrices first, as before


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=cfg.warmup(max_steps), max_steps=max_steps,
                         min_lr_ratio=cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm of `max_norm` (0: measure only) and return that norm.

    Under tensor parallel, parameters live on different meshes (split weights on the TP mesh,
    norms and embeddings on the data-parallel one), and one `torch.stack` across meshes fails. So
    the norm is taken per mesh, made a plain tensor, combined, and applied per mesh. The result
    stays on the device: nothing here waits for the host.
    """
    groups: dict[object, list[nn.Parameter]] = defaultdict(list)
    for param in parameters:
        if param.grad is not None:
            groups[_mesh_of(param.grad)].append(param)
    if not groups:
        return torch.zeros(())
    squares = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0,
                                             foreach=_foreach(params[0].grad))
        if isinstance(norm, torch.distributed.tensor.DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].device),
                                                 foreach=_foreach(params[0].grad))
    return total


def _mesh_of(grad: torch.Tensor) -> object:
    if isinstance(grad, torch.distributed.tensor.DTensor):
        return grad.device_mesh
    return None
