"""What trainer.precision changes in the planner's figures: the precisions `auto` chooses from on a
hardware, and for fp8 / mxfp8 the matmul time, the casts' time and the float8 all-gather.

A low-precision run converts the matmuls its model family chooses (`ModelCosts.
low_precision_flops_per_token`; the head, attention's score and value products, norms stay bf16)
and runs them at the format's dense peak from the hardware catalog (`peak_tflops_fp8`,
`peak_tflops_mxfp8`) with the same plan.mfu as bf16; the rest runs at the bf16 peak. Where the
catalog lists no low-precision format for the hardware (cpu: torchao's emulation) the converted
matmuls run at the bf16 peak: emulation is never faster. Casting to fp8 is memory-bound work the
matmuls wait for (`cast_seconds`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from trainer.config import LOW_PRECISION_FORMATS, PRECISION_AUTO, RunConfig
from trainer.models.family import ModelCosts, ParamGroup, Widths
from trainer.models.low_precision import MXFP8_RECIPE, LowPrecision
from trainer.plan.dims import ParallelDims

if TYPE_CHECKING:
    from trainer.hardware import HardwareSpec

# What `auto` compares against the hardware's low-precision formats: the mixed precision every
# published bf16 run uses (fp32 master weights, bf16 matmuls).
BF16 = "bf16-mixed"
# Bytes of memory traffic per element cast, per pass, counting both layouts a matmul's operand is
# needed in (forward, and transposed for the weight gradient) from a bf16 source:
#   tensorwise: one amax read (2 B), then per layout a read (2 B) and a float8 write (1 B): 2 + 2x3
#   rowwise: an amax read and a cast per layout (scales along the other axis): 2 x (2 + 3)
#   MXFP8 (block scales of 32, computed in the cast's own pass): per layout 2 + 1 (+1/32): 2 x 3
# Kernel fusion (torch.compile) can only lower these.
CAST_BYTES = {"tensorwise": 8.0, "rowwise": 10.0, MXFP8_RECIPE: 6.0}
FLOAT8_BYTES = 1


def options(run: RunConfig) -> tuple[str, ...]:
    """The precisions the planner chooses among: trainer.precision itself, or under auto
    bf16-mixed and the formats the hardware's stack trains with (hardware.low_precision), in
    that order (the first wins a tie)."""
    if run.trainer.precision != PRECISION_AUTO:
        return (run.trainer.precision,)
    return (BF16, *run.hardware.low_precision)


def with_precision(run: RunConfig, precision: str) -> RunConfig:
    return dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, precision=precision))


def low_precision(run: RunConfig, dims: ParallelDims) -> LowPrecision | None:
    return LowPrecision.of(run, fsdp=dims.fsdp)


def peak(hw: HardwareSpec, run: RunConfig) -> float:
    """FLOP/s per rank of the converted matmuls: the format's peak where the hardware trains
    with it, else (emulation) the bf16 peak."""
    fmt = run.trainer.precision
    if fmt in LOW_PRECISION_FORMATS and fmt in run.hardware.low_precision:
        return hw.peak_flops_per_rank(fmt)
    return hw.peak_flops_per_rank()


def converted_flops_per_token(costs: ModelCosts, run: RunConfig) -> float:
    """Training FLOPs per token that run in the low-precision format (0 in bf16 and for a model
    that names none)."""
    if run.trainer.precision not in LOW_PRECISION_FORMATS:
        return 0.0
    return getattr(costs, "low_precision_flops_per_token", lambda: 0.0)()


def cast_seconds(costs: ModelCosts, run: RunConfig, dims: ParallelDims,
                 local_converted_weights: float, passes: float) -> float:
    """Seconds per step one rank spends casting to fp8 at the memory bandwidth: the converted
    matmuls' inputs and output gradients for its tokens (`passes`: 1, or more when activation
    checkpointing repeats the forward), and each micro-batch its converted weights (the shard
    alone with float8 all-gather, which casts before gathering)."""
    low = low_precision(run, dims)
    if low is None:
        return 0.0
    elements = getattr(costs, "low_precision_cast_elements_per_token", lambda tp: 0.0)(dims.tp)
    tokens = dims.tokens_per_microbatch * dims.accumulation
    weights = local_converted_weights / (dims.fsdp_size if low.float8_all_gather else 1)
    nbytes = CAST_BYTES[low.recipe] * (elements * tokens * passes
                                       + weights * dims.accumulation)
    return nbytes / (run.hardware.memory_bw_gbs * 1e9 / run.hardware.ranks_per_chip)


def gather_width(run: RunConfig, dims: ParallelDims, w: Widths) -> Callable[[ParamGroup], float]:
    """Bytes per element FSDP all-gathers of each parameter group: float8 for the converted
    weights under float8 all-gather, else `Widths.gather`."""
    low = low_precision(run, dims)
    if low is None or not low.float8_all_gather:
        return lambda g: w.gather
    return lambda g: FLOAT8_BYTES if g.low_precision else w.gather
