"""How the MoE decoder is laid out over a device mesh: tensor parallel, expert parallel,
activation checkpointing and FSDP2, in that order.

- Tensor parallel as Llama's (Megatron-LM's layout) for attention, the dense layers' and the
  shared experts' SwiGLUs, the embedding and the head. The router stays whole (every tp rank
  routes the same tokens the same way), and so do the per-head q/k norms, whose gradients the tp
  ranks sum (each saw its own heads: `model.HeadNorm`). The routed experts are split on their
  hidden size too (w1/w3 by rows, w2 by columns: each tp rank computes a partial sum that one
  all-reduce completes), so tensor parallel divides the experts' memory and FLOPs as it does the
  dense SwiGLU's. Sequence parallel is not offered for this family.
- Expert parallel (`dims.ep`): each MoE layer's experts split whole over the ep ranks, which it
  borrows from dp_shard (`trainer.plan.dims`): the experts' mesh is dp_shard unflattened into
  (dp_shard_mod_ep, ep). Tokens travel to their experts' rank and back by all-to-all
  (`trainer.models.moe.experts.Exchange`).
- FSDP2: one unit per layer's experts over the dp_shard ranks ep leaves (with dp_replicate as
  HSDP); each rank's experts sum the gradient of the tokens all its ep peers sent, so FSDP's
  mean over ep times fewer ranks would be ep times too large: the experts scale their gradient
  by 1 / ep themselves (`model._local`; FSDP2's set_gradient_divide_factor needs a PREMUL_SUM
  reduction, which gloo lacks). An expert stack that does not split evenly into whole experts
  is split on another dim that does (torchtitan splits on rows the same way; FSDP2 pads only
  dim 0), so no rank pads whole experts. Then one unit per block, the embedding, the final norm
  with the head, and the root, as Llama's.
- torch.compile is not offered: the dropless exchange's sizes change every step.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from trainer.config import KEY, ParallelismConfig
from trainer.models.moe.model import Experts, Transformer
from trainer.models.parallel import (
    apply_activation_checkpointing,
    check_replicated,
    expert_mesh,
    mixed_precision_policy,
)
from trainer.plan.dims import EP_DIM, EXPERT_FSDP_DIM

if TYPE_CHECKING:
    from trainer.plan import ParallelDims


def parallelize(model: Transformer, mesh: DeviceMesh | None, dims: ParallelDims,
                cfg: ParallelismConfig, *, backend: str | None = None,
                low_precision: Any = None) -> Transformer:
    """Apply tensor parallel, expert parallel, activation checkpointing and FSDP2 to `model` in
    place, as `dims` says, over `mesh` (None when the dims need none); returns `model`. The
    options the family does not offer (`refuse_options` in this package) are refused here too,
    for callers that come without a validated run."""
    if low_precision is not None:
        raise ValueError(f"{KEY.trainer.precision}={low_precision.format}: not offered for "
                         "model.family=moe (docs/moe.md)")
    for key, on in ((KEY.parallelism.compile, cfg.compile),
                    (KEY.parallelism.sequence_parallel, cfg.sequence_parallel)):
        if on:
            raise ValueError(f"{key}=true: not offered for model.family=moe (docs/moe.md)")
    experts_mesh = expert_mesh(mesh, dims) if mesh is not None else None
    if dims.tensor_parallel:
        apply_tensor_parallel(model, mesh["tp"])
        check_replicated(model, mesh["tp"])
    if dims.tensor_parallel or dims.expert_parallel:
        apply_expert_parallel(model, experts_mesh, dims)
    if dims.activation_checkpointing:
        apply_activation_checkpointing(model.layers)
    if dims.fsdp:
        apply_fsdp(model, mesh, experts_mesh, dims, mixed_precision_policy(cfg))
    return model


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Llama's plan (trainer/models/llama/parallelize.py) without sequence parallel, for every
    linear layer but the router; the experts are split in `apply_expert_parallel`."""
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    })
    for block in model.layers.values():
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel()}
        swiglus = ["feed_forward"] if hasattr(block, "feed_forward") else (
            ["moe.shared"] if block.moe.shared is not None else [])
        for name in swiglus:
            plan |= {f"{name}.w1": ColwiseParallel(), f"{name}.w3": ColwiseParallel(),
                     f"{name}.w2": RowwiseParallel()}
        parallelize_module(block, tp_mesh, plan)
        block.attention.q_norm.tp_mesh = block.attention.k_norm.tp_mesh = tp_mesh


def apply_expert_parallel(model: Transformer, experts_mesh: DeviceMesh, dims: ParallelDims) -> None:
    """Split each expert stack: whole experts (dim 0) over ep, each expert's hidden size over tp
    (rows of w1/w3, columns of w2), and hand the experts their ep group and tp mesh."""
    names = [n for n, on in ((EP_DIM, dims.expert_parallel), ("tp", dims.tensor_parallel)) if on]
    sub = experts_mesh[tuple(names)]
    for experts in _experts(model):
        for name, hidden_dim in (("w1", 1), ("w2", 2), ("w3", 1)):
            placements = [Shard(0) if n == EP_DIM else Shard(hidden_dim) for n in names]
            param = getattr(experts, name)
            setattr(experts, name, nn.Parameter(distribute_tensor(param.data, sub, placements,
                                                                  src_data_rank=None)))
        if dims.expert_parallel:
            experts.ep_group = experts_mesh[EP_DIM].get_group()
            experts.ep = dims.ep
        if dims.tensor_parallel:
            experts.tp_mesh = experts_mesh["tp"]


def apply_fsdp(model: Transformer, mesh: DeviceMesh, experts_mesh: DeviceMesh,
               dims: ParallelDims, policy: MixedPrecisionPolicy) -> None:
    """The units of the module docstring. Experts shard over what ep leaves of dp_shard."""
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    dense_mesh = mesh[dims.fsdp_dim_names]
    replicate = ("dp_replicate",) if dims.dp_replicate > 1 else ()
    expert_fsdp = experts_mesh[(*replicate, EXPERT_FSDP_DIM)]
    shards = dims.fsdp_size_of((EP_DIM,))
    for block in model.layers.values():
        for experts in _experts(block):
            fully_shard(experts, mesh=expert_fsdp, mp_policy=policy,
                        shard_placement_fn=lambda param: Shard(even_dim(param, shards)))
        fully_shard(block, mesh=dense_mesh, mp_policy=policy)
    fully_shard(model.tok_embeddings, mesh=dense_mesh, mp_policy=policy)
    fully_shard([model.norm, model.output], mesh=dense_mesh, mp_policy=policy,
                reshard_after_forward=False)
    fully_shard(model, mesh=dense_mesh, mp_policy=policy)


def even_dim(param: nn.Parameter, shards: int) -> int:
    """The dim FSDP2 shards an expert stack on: whole experts (0) when they split evenly, else
    the first dim of this rank's stack that does (FSDP2 pads only dim 0; the planner refuses
    meshes where no dim divides)."""
    local = param.to_local().shape if isinstance(param, DTensor) else param.shape
    return next((d for d, size in enumerate(local) if size % shards == 0), 0)


def _experts(module: nn.Module) -> list[Experts]:
    return [m for m in module.modules() if isinstance(m, Experts)]
