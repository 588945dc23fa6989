"""Lay the reference decoder out over a device mesh: tensor parallel, torch.compile, activation
checkpointing, then FSDP2, each block at a time. The model is still on the meta device here; the
module allocates and initialises each rank's shards afterwards (`Transformer.init_weights`).

FSDP2 comes last because it shards the DTensors tensor parallel made and wraps whatever the blocks
have become. Checkpointing wraps the compiled block rather than being compiled into it; torchtitan
applies AC first and compiles the checkpointed block, but with torch 2.13 AOTAutograd refuses a
checkpointed tensor-parallel block ("expected all tensors_saved_with_vc_check to be Tensors"),
while a checkpoint around the compiled block trains like the eager model. Either way a block
keeps only its input for backward.

What to apply comes from the `MeshPlan` (`trainer.plan`), whose dims name the mesh's:
("dp_replicate", "dp_shard", "cp", "tp").

- Tensor parallel (Megatron-LM's layout, Shoeybi et al. 2019): wq/wk/wv and w1/w3 split by output
  columns, wo and w2 by input rows, so each block needs one all-reduce after attention and one after
  the feed-forward. The embedding table and the output head split by vocabulary. With
  `sequence_parallel` the norms and the residual stream between blocks are split by sequence
  instead of replicated (Korthikanti et al. 2022), and those all-reduces become reduce-scatter +
  all-gather.
- Parameters tensor parallel leaves whole (the norms) must start identical on every TP rank; the
  module seeds every rank the same, and `check_replicated` proves it before training starts.
- FSDP2 (`fully_shard`) wraps each block, the embedding, and the final norm with the head, then the
  root; over ("dp_replicate", "dp_shard") it is HSDP: sharded within a replica, replicated across.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from trainer.config import KEY, ParallelismConfig
from trainer.models.llama import Transformer
from trainer.plan import MeshPlan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# torch.compile backend per device type: TorchNeuron registers its own; inductor elsewhere.
COMPILE_BACKENDS = {"cuda": "inductor", "cpu": "inductor", "neuron": "neuron"}


def parallelize(model: Transformer, mesh: DeviceMesh | None, plan: MeshPlan,
                cfg: ParallelismConfig, *, precision: str = "32-true",
                compile_backend: str | None = None) -> Transformer:
    """Apply tensor parallel, compile, activation checkpointing and FSDP2 to `model` in place,
    as `plan` says, over `mesh` (built from the same plan; None for a plan without one, where
    only compile and activation checkpointing apply); returns `model`.

    `cfg` gives the switches the plan does not own (sequence parallel, compile, FSDP dtypes);
    `precision` is Lightning's (trainer.precision). `compile_backend` overrides the device
    type's torch.compile backend (`COMPILE_BACKENDS`).
    """
    if plan.cp > 1:
        raise NotImplementedError("context parallel (cp > 1) is not implemented yet")
    if plan.tensor_parallel:
        check_tp_degree(model, plan.tp)
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=cfg.sequence_parallel)
        check_replicated(model, mesh["tp"])
    if cfg.compile:
        if plan.tensor_parallel:
            copy_embedding_output(model)
        device_type = mesh.device_type if mesh is not None else "cpu"
        apply_compile(model, compile_backend or COMPILE_BACKENDS.get(device_type, "inductor"))
    if plan.activation_checkpointing:
        apply_activation_checkpointing(model)
    if plan.fsdp:
        apply_fsdp(model, mesh[plan.fsdp_dim_names], mixed_precision_policy(cfg))
    return model


# ------------------------------------------------------------------------------------------------
# Tensor parallel


def check_tp_degree(model: Transformer, tp: int) -> None:
    """Heads must split evenly: a rank computes with whole heads, and grouped-query attention
    needs each rank's query heads to share that rank's key/value heads. (Other split dims may be
    uneven: DTensor pads them.)"""
    args = model.args
    for what, size in ((KEY.model.n_heads, args.n_heads), (KEY.model.n_kv_heads, args.n_kv_heads)):
        if size % tp:
            raise ValueError(f"{KEY.parallelism.tp}={tp} must divide {what}={size}")


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, *,
                          sequence_parallel: bool) -> None:
    """Split the projections over `tp_mesh` (the Megatron layout described in the module doc)."""
    # With sequence parallel the residual stream is sharded on dim 1 (sequence) between blocks.
    stream = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        "output": ColwiseParallel(input_layouts=stream, output_layouts=Replicate()),
        **({"norm": SequenceParallel()} if sequence_parallel else {}),
    })
    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream),
        }
        if sequence_parallel:
            plan |= {
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                # blocks call attention(x, cos, sin): gather x's sequence, leave the tables alone
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                desired_input_layouts=(Replicate(), None, None)),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                   desired_input_layouts=(Replicate(),)),
            }
        parallelize_module(block, tp_mesh, plan)
    if model.args.tie_embeddings:
        # Each style distributed its own copy; both shard the [vocab, dim] matrix on dim 0, so
        # one DTensor serves both again.
        model.output.weight = model.tok_embeddings.weight


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


# ------------------------------------------------------------------------------------------------
# Compile and activation checkpointing


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's forward in backward instead of keeping its activations: a block
    then keeps only its input (torchtitan's "full" mode)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(model.layers.items()):
        # checkpoint_wrapper's state-dict hooks drop its prefix: checkpoint keys stay the same
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)


def copy_embedding_output(model: Transformer) -> None:
    """Hand the first compiled block a tensor of its own, not the view of a DTensor's local
    shard that tensor parallel's embedding returns.

    Seen with torch 2.13 (inductor and aot_eager alike): when a compiled block's input is such a
    view, its backward hands DTensor's redistribution a plain tensor ("'Tensor' object has no
    attribute '_local_tensor'") and, under FSDP2, silently wrong gradients. One copy of the
    embedding output, [batch, seq, dim], avoids both.
    """
    model.tok_embeddings.register_forward_hook(lambda module, args, output: output.clone())


def apply_compile(model: Transformer, backend: str) -> None:
    """Compile each block on its own: the blocks share one graph (compiled once), and FSDP2's
    hooks stay between blocks, outside the graphs. In place, so parameter names do not change."""
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=True)


# ------------------------------------------------------------------------------------------------
# FSDP2


def mixed_precision_policy(cfg: ParallelismConfig) -> MixedPrecisionPolicy:
    """FSDP's gather and reduce dtypes from parallelism.param_dtype / reduce_dtype (None: the
    parameters' own dtype, as the planner assumes; `trainer.config` refuses combinations that
    make no sense with the precision)."""
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.param_dtype] if cfg.param_dtype else None,
        reduce_dtype=DTYPES[cfg.reduce_dtype] if cfg.reduce_dtype else None,
    )


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """One FSDP unit per block, one for the embedding, one for the final norm and the head (kept
    gathered after forward: backward needs them first), then the root.

    Tied embeddings are one parameter in two places; it then stays with the root rather than
    being claimed by two units.
    """
    # FSDP2 warns that a unit returning a view loses its pre-backward hook to in-place ops on
    # that view. The units here return tensor parallel's to_local() views, and nothing in the
    # model or the loss modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    def shard(module: nn.Module | list[nn.Module], **kwargs) -> None:
        fully_shard(module, mesh=dp_mesh, mp_policy=policy, **kwargs)

    for block in model.layers.values():
        shard(block)
    if not model.args.tie_embeddings:
        shard(model.tok_embeddings)
        shard([model.norm, model.output], reshard_after_forward=False)
    shard(model)
