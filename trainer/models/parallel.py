"""Parallelism every model family applies the same way: FSDP2's mixed precision, torch.compile and
activation checkpointing per block, and the check that tensor-parallel ranks start alike. What is
particular to a family (its tensor-parallel plan, its FSDP units) lives in the family's own
`parallelize`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Shard

from trainer.config import ParallelismConfig
from trainer.plan.dims import EP_SPLITS, ParallelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# torch.compile backend per device type: TorchNeuron registers its own; inductor elsewhere.
COMPILE_BACKENDS = {"cuda": "inductor", "cpu": "inductor", "neuron": "neuron"}


def compile_backend(device_type: str) -> str:
    return COMPILE_BACKENDS.get(device_type, "inductor")


def mixed_precision_policy(cfg: ParallelismConfig) -> MixedPrecisionPolicy:
    """FSDP's gather and reduce dtypes from parallelism.param_dtype / reduce_dtype (None: the
    parameters' own dtype, as the planner assumes; `trainer.config` refuses combinations that
    make no sense with the precision)."""
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.param_dtype] if cfg.param_dtype else None,
        reduce_dtype=DTYPES[cfg.reduce_dtype] if cfg.reduce_dtype else None,
    )


def check_replicated(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Raise unless every parameter tensor parallel does not split holds the same values on
    every rank of `tp_mesh`.

    One collective for all of them: each rank contributes (sum, sum of squares) per parameter in
    float64, reduced with MAX and with -MIN; any difference between ranks shows up as max != min.
    Parameters on the meta device carry no values and are skipped.
    """
    names, fingerprints = [], []
    for name, param in model.named_parameters():
        if _split_over(param, tp_mesh) or param.device.type == "meta":
            continue
        values = (param.to_local() if isinstance(param, DTensor) else param).detach().double()
        names.append(name)
        fingerprints.append(torch.stack((values.sum(), values.pow(2).sum())).cpu())
    if not names:
        return
    local = torch.stack(fingerprints).to(_comm_device(tp_mesh))
    group = tp_mesh.get_group()
    high, low = local.clone(), -local
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MAX, group=group)
    differs = (high != -low).any(dim=1).tolist()
    bad = [name for name, diff in zip(names, differs, strict=True) if diff]
    if bad:
        raise RuntimeError(
            f"{len(bad)} parameter(s) that tensor parallel keeps whole differ between TP ranks "
            f"(first: {bad[0]}); seed every rank the same before building the model")


def _split_over(param: torch.Tensor, tp_mesh: DeviceMesh) -> bool:
    """True for a DTensor sharded over the TP mesh."""
    if not isinstance(param, DTensor) or tp_mesh.mesh_dim_names is None:
        return False
    names = param.device_mesh.mesh_dim_names or ()
    tp_name = tp_mesh.mesh_dim_names[0]
    return tp_name in names and isinstance(param.placements[names.index(tp_name)], Shard)


def _comm_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())


def apply_activation_checkpointing(blocks: nn.ModuleDict) -> None:
    """Recompute each block's forward in backward instead of keeping its activations: a block
    then keeps only its input (torchtitan's "full" mode)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(blocks.items()):
        # checkpoint_wrapper's state-dict hooks drop its prefix: checkpoint keys stay the same
        blocks[key] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(blocks: nn.ModuleDict, backend: str) -> None:
    """Compile each block on its own: the blocks share one graph (compiled once), and FSDP2's
    hooks stay between blocks, outside the graphs. In place, so parameter names do not change."""
    for block in blocks.values():
        block.compile(backend=backend, fullgraph=True)


def expert_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The experts' mesh of `dims`: `mesh` with dp_shard unflattened into (dp_shard_mod_ep, ep),
    ep varying fastest (`ParallelDims.expert_mesh_shape`). It shares `mesh`'s ranks and root, so
    FSDP2 can shard over one of its dims what another splits."""
    shape, names = dims.expert_mesh_shape
    at = dims.dim_names.index(EP_SPLITS)
    return mesh._unflatten(EP_SPLITS, shape[at:at + 2], names[at:at + 2])
