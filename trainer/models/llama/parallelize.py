"""Lay the Llama decoder out over a device mesh: tensor parallel, torch.compile, activation
checkpointing, then FSDP2, each block at a time, while the model is still on the meta device (the
module allocates and initialises each rank's shards afterwards).

FSDP2 comes last because it shards the DTensors tensor parallel made and wraps whatever the blocks
have become. Checkpointing wraps the compiled block rather than being compiled into it: with torch
2.13 AOTAutograd refuses a checkpointed tensor-parallel block ("expected all
tensors_saved_with_vc_check to be Tensors"). Either way a block keeps only its input for backward.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from trainer.config import ParallelismConfig
from trainer.models import low_precision as lp
from trainer.models.llama.model import Transformer
from trainer.models.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    check_replicated,
    compile_backend,
    mixed_precision_policy,
)

if TYPE_CHECKING:
    from trainer.plan import ParallelDims


def parallelize(model: Transformer, mesh: DeviceMesh | None, dims: ParallelDims,
                cfg: ParallelismConfig, *, backend: str | None = None,
                low_precision: lp.LowPrecision | None = None) -> Transformer:
    """Apply low precision, tensor parallel, compile, activation checkpointing and FSDP2 to
    `model` in place, as `dims` says, over `mesh` (built from the same dims; None when they need
    none, where only compile and activation checkpointing apply); returns `model`. `cfg` gives
    the switches the dims do not own (sequence parallel, compile, FSDP dtypes); `backend`
    overrides the device type's torch.compile backend; `low_precision` converts the block
    projections the shape names (`LlamaArgs.low_precision_linears`) to fp8 / mxfp8 first."""
    if low_precision is not None:
        converted = set(model.args.low_precision_linears())
        lp.convert(model, low_precision, lambda fqn: fqn.startswith("layers.")
                   and fqn.split(".", 2)[2] in converted)
    if dims.tensor_parallel:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=cfg.sequence_parallel)
        check_replicated(model, mesh["tp"])
    if cfg.compile:
        if dims.tensor_parallel:
            copy_embedding_output(model)
        apply_compile(model.layers, backend or compile_backend(
            mesh.device_type if mesh is not None else "cpu"))
    if dims.activation_checkpointing:
        apply_activation_checkpointing(model.layers)
    if dims.fsdp:
        apply_fsdp(model, mesh[dims.fsdp_dim_names], mixed_precision_policy(cfg))
    return model


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, *,
                          sequence_parallel: bool) -> None:
    """Megatron-LM's layout (Shoeybi et al. 2019): wq/wk/wv and w1/w3 split by output columns, wo
    and w2 by input rows, so each block needs one all-reduce after attention and one after the
    feed-forward; the embedding table and the output head split by vocabulary. With
    `sequence_parallel` the norms and the residual stream between blocks are split by sequence
    instead (Korthikanti et al. 2022), and those all-reduces become reduce-scatter + all-gather.
    The norms stay whole: `check_replicated` proves they start alike on every tp rank."""
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
                # blocks call attention(x, cos, sin, mask): gather x's sequence, leave the
                # tables and the document mask alone
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None, None),
                    desired_input_layouts=(Replicate(), None, None, None)),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                   desired_input_layouts=(Replicate(),)),
            }
        parallelize_module(block, tp_mesh, plan)
    if model.args.tie_embeddings:
        # Each style distributed its own copy; both shard the [vocab, dim] matrix on dim 0, so
        # one DTensor serves both again.
        model.output.weight = model.tok_embeddings.weight


def copy_embedding_output(model: Transformer) -> None:
    """Hand the first compiled block a tensor of its own, not the view of a DTensor's local
    shard that tensor parallel's embedding returns.

    With torch 2.13, a compiled block whose input is such a view hands DTensor's redistribution a
    plain tensor in backward ("'Tensor' object has no attribute '_local_tensor'") and, under
    FSDP2, silently wrong gradients; one copy of the embedding output avoids both.
    """
    model.tok_embeddings.register_forward_hook(lambda module, args, output: output.clone())


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
