"""AdamW, the warmup + cosine schedule, and gradient clipping that works on sharded parameters."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from trainer.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: decaying norm gains pulls them towards zero,
    which only hurts. DTensors and plain tensors go in separate groups: a foreach kernel takes
    one kind (tensor parallel without FSDP leaves some weights plain, e.g. an MoE router)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            kind = (param.ndim >= 2, isinstance(param, torch.distributed.tensor.DTensor))
            groups.setdefault(kind, []).append(param)
    # foreach keeps the update to a handful of kernels; fused is not implemented for DTensor.
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0}
         for (decay, _), params in sorted(groups.items(), reverse=True)],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True
    )


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
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(norm, torch.distributed.tensor.DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].device))
    return total


def _mesh_of(grad: torch.Tensor) -> object:
    if isinstance(grad, torch.distributed.tensor.DTensor):
        return grad.device_mesh
    return None
