"""What a model family is, and what the planner asks of one. No torch here: the planner and the
command lines that only plan import this without paying torch's import time.

A family (`ModelFamily`) names its shape dataclass and the functions that build, lay out,
initialise and convert its models. The shape itself answers the planner (`ModelCosts`): the
parameters by how they shard, the FLOPs per token, the activation bytes per token and the traffic
tensor parallel causes. torchtitan's `ModelSpec` is the model for this; here the shape is the
cost model too, because every figure follows from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from trainer.models.hf import HFAdapter


@dataclass(frozen=True)
class Widths:
    """Bytes per element of each kind of tensor, from trainer.precision and parallelism.*_dtype.

    master: the stored (sharded) parameters, their gradients and AdamW's two states, which
        torch keeps in the parameter dtype: fp32, or bf16 under "bf16-true".
    compute: matmul inputs and outputs, hence most saved activations: 16-bit under mixed
        precision or "bf16-true"; parallelism.param_dtype where FSDP wraps the model (its
        MixedPrecisionPolicy casts the weights and each unit's inputs).
    residual: the residual stream between blocks. Under autocast the embedding lookup stays in
        fp32 and so does every residual add; it is 16-bit only when the weights themselves are.
    gather / reduce: what FSDP all-gathers parameters and reduces gradients in.
    autocast_copies: mixed precision without FSDP's param_dtype: autocast casts every fp32
        weight to 16 bits and caches the copy until the forward pass ends (the cast of a leaf
        tensor that requires grad is cached even under no_grad, so checkpointing does not help).
    """

    master: int
    compute: int
    residual: int
    gather: int
    reduce: int
    autocast_copies: bool


@dataclass(frozen=True)
class ParamGroup:
    """Parameters alike in how they shard: `units` FSDP units of one kind hold `per_unit`
    elements each. `split` names the mesh dims other than FSDP's that divide them (tensor
    parallel's "tp"); FSDP shards every group. `matmul`: the weights go through a matmul (an
    embedding table is a lookup). `low_precision`: the family converts these matmuls to fp8 /
    mxfp8 under those precisions (its `parallelize` does; what stays bf16 is its decision)."""

    unit: str
    per_unit: int
    units: int = 1
    split: tuple[str, ...] = ()
    matmul: bool = False
    low_precision: bool = False

    def local(self, sizes: Mapping[str, int]) -> float:
        """Elements of the whole group one rank holds before FSDP shards it."""
        return self.per_unit * self.units / math.prod(sizes.get(d, 1) for d in self.split)


@dataclass(frozen=True)
class ParamCounts:
    """A model's parameters as groups (`ParamGroup`), with the sums the planner needs."""

    groups: tuple[ParamGroup, ...]

    @property
    def total(self) -> int:
        return sum(g.per_unit * g.units for g in self.groups)

    @property
    def matmul(self) -> int:
        return sum(g.per_unit * g.units for g in self.groups if g.matmul)

    def per_rank(self, sizes: Mapping[str, int]) -> float:
        """Elements one rank holds when the split dims have `sizes`, before FSDP."""
        return sum(g.local(sizes) for g in self.groups)

    def matmul_per_rank(self, sizes: Mapping[str, int]) -> float:
        return sum(g.local(sizes) for g in self.groups if g.matmul)

    def largest_unit(self, sizes: Mapping[str, int]) -> float:
        """The most elements one FSDP all-gather materializes on a rank: the largest unit."""
        return self.largest_unit_bytes(sizes, lambda g: 1.0)

    def low_precision_per_rank(self, sizes: Mapping[str, int]) -> float:
        """Elements of the matmul weights the family converts to fp8 / mxfp8 one rank holds."""
        return sum(g.local(sizes) for g in self.groups if g.low_precision)

    def per_rank_bytes(self, sizes: Mapping[str, int], width: Callable[[ParamGroup], float]
                       ) -> float:
        """Bytes one rank holds before FSDP when each group's elements take `width(group)`."""
        return sum(g.local(sizes) * width(g) for g in self.groups)

    def largest_unit_bytes(self, sizes: Mapping[str, int],
                           width: Callable[[ParamGroup], float]) -> float:
        """The most bytes one FSDP all-gather materializes on a rank, each group at `width`."""
        by_unit: dict[str, float] = {}
        for g in self.groups:
            by_unit[g.unit] = by_unit.get(g.unit, 0.0) + g.local(sizes) / g.units * width(g)
        return max(by_unit.values(), default=0.0)


class ModelCosts(Protocol):
    """What the planner asks of a model's shape. Figures are per token of a micro-batch, so the
    planner scales them by the tokens a rank holds; `w` gives the bytes of each kind of tensor."""

    vocab_size: int

    def param_counts(self) -> ParamCounts: ...

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token."""

    def activation_bytes_per_token(self, w: Widths, *, tp: int, sequence_parallel: bool,
                                   checkpointing: bool) -> float:
        """Bytes autograd keeps for backward across all layers and the head's input."""

    def document_mask_bytes_per_token(self, w: Widths, seq_len: int) -> float:
        """Bytes autograd keeps per token beyond `activation_bytes_per_token` when attention is
        masked by document (`data.document_mask`): the mask the attention kernel reads, and
        positions that restart per document. Asked only of families; a user's module gets no
        document mask."""

    def tp_bytes_per_token(self, w: Widths, *, tp: int, checkpointing: bool) -> float:
        """Bytes one rank sends for tensor parallel per token of a micro-batch."""

    def tp_rejection(self, tp: int) -> tuple[str, int, str] | None:
        """(key, value, why) when tensor parallel of degree `tp` cannot split this shape."""

    # Optional, for trainer.precision=fp8 / mxfp8 (a model without them plans every matmul in
    # bf16): the family's converted matmuls, as its `parallelize` converts them.

    def low_precision_flops_per_token(self) -> float:
        """Training FLOPs per token of the matmuls the family converts (part of
        `flops_per_token`)."""

    def low_precision_cast_elements_per_token(self, tp: int) -> float:
        """Elements one rank casts to fp8 per token per pass: the inputs and the output
        gradients of the converted matmuls, under tensor parallel of degree `tp`."""


@dataclass(frozen=True)
class ModelFamily:
    """One model family: its shape dataclass (which is also its `ModelCosts`) and the functions
    the trainer, the validation and the Hugging Face conversion call. The functions import
    torch when called, so holding a family costs nothing."""

    name: str
    shape: type  # a dataclass whose fields are `model.*` keys of trainer.config.ModelConfig
    build: Callable[[Any], nn.Module]  # the model of a shape, on the current default device
    # (model, mesh, dims, ParallelismConfig, *, backend, low_precision): low_precision is a
    # `trainer.models.low_precision.LowPrecision` or None; the family converts what it chooses
    parallelize: Callable[..., nn.Module]
    init_weights: Callable[[nn.Module, int, Any], None]  # (model, seed, buffer device)
    hf: Callable[[], HFAdapter]  # the Hugging Face adapter (config and weight names)
    # (run): raise ConfigError for a run option the family does not train with, before any
    # process starts (e.g. MoE and torch.compile)
    refuse_options: Callable[[Any], None] = lambda run: None

    def shape_of(self, model_cfg: Any) -> Any:
        """The shape keys of a `ModelConfig` (or a DictConfig of one) this family reads."""
        return self.shape(**{f.name: getattr(model_cfg, f.name) for f in fields(self.shape)})

    def shape_keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.shape))


def ring_allreduce(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `nbytes` over n ranks."""
    return 2 * (n - 1) / n * nbytes


def ring_gather(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-gather (or reduce-scatter) of `nbytes` in total."""
    return (n - 1) / n * nbytes
