"""Which plans the XLA path (`trainer.xla`) runs, and what its step costs differently.

It runs whole-model replicas: data parallel over `dp_replicate`, gradients all-reduced through
XLA (`xm.reduce_gradients`) after backward. Everything else is refused here, in one line, before
any process starts: tensor parallel on the XLA path is neuronx-distributed's (its own layers),
FSDP2 and DTensor do not run on lazy XLA tensors, and torch-xla's own sharding (ZeRO-1's
`ZeroRedundancyOptimizer`, SPMD FSDP) is not wired (docs/hardware/trainium-xla.md).
"""

from __future__ import annotations

from trainer.config import KEY, RunConfig
from trainer.plan.dims import ParallelDims
from trainer.plan.rejection import Rejection

_NOT_HERE = "on the XLA path (strategy=xla, or hardware whose backend is xla)"


def rejection(run: RunConfig, dims: ParallelDims) -> Rejection | None:
    """Why the XLA path cannot run `dims`, or None."""
    if dims.tp > 1:
        return Rejection(KEY.parallelism.tp, dims.tp,
                         f"tensor parallel is not available {_NOT_HERE}: it takes "
                         "neuronx-distributed's layers there; train TP on TorchNeuron (trn2, trn3) "
                         "or use dp_replicate")
    if dims.dp_shard > 1:
        return Rejection(KEY.parallelism.dp_shard, dims.dp_shard,
                         f"sharding is not available {_NOT_HERE}: FSDP2 needs DTensor, which "
                         "lazy XLA tensors do not run, and torch-xla's ZeRO-1 and SPMD FSDP are "
                         "not wired; use dp_replicate (data parallel)")
    p = run.parallelism
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(p, key) is not None:
            return Rejection(getattr(KEY.parallelism, key), getattr(p, key),
                             f"is FSDP2's {_NOT_HERE}; leave it null (the weights' dtype is "
                             f"{KEY.trainer.precision}'s)")
    if dims.activation_checkpointing:
        return Rejection(KEY.parallelism.activation_checkpointing, True,
                         f"is not available {_NOT_HERE}: XLA folds torch's recomputation away "
                         "(torch_xla has its own checkpoint, not wired); use false")
    if p.compile:
        return Rejection(KEY.parallelism.compile, True,
                         f"does not apply {_NOT_HERE}: XLA compiles every step's graph itself")
    return None


def step_time(times: dict[str, float]) -> dict[str, float]:
    """The XLA step: the gradient all-reduce runs after backward, in the same compiled graph, so
    no traffic is counted as hidden behind compute (the mesh path overlaps it, `planner.step_time`
    assumes plan.overlap of it)."""
    exposed = times["fsdp"] + times["replicate"]
    return {**times, "exposed_dp": exposed, "step": times["compute"] + times["tp"] + exposed}
