"""`MeshPlan`: a run's ranks as named mesh dims, the batch they carry and what they switch on.

The value the strategy, the module and `parallelize` read (like torchtitan's `ParallelDims`);
`trainer.plan.planner` makes one and attaches its estimates. Arithmetic only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rejection:
    """Why a plan cannot run: the config key to change, its value, and what is wrong."""

    key: str
    value: Any
    why: str
    kind: str = "shape"  # "shape" (dims vs model / topology / batch), "link" or "memory"

    def __str__(self) -> str:
        return f"{self.key}={self.value}: {self.why}"


MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")  # outermost to innermost


@dataclass(frozen=True)
class MeshPlan:
    """A mesh shape over named dims, the batch it carries, and the planner's estimates for it.

    The one value that owns the mesh's vocabulary (like torchtitan's `ParallelDims`): its dims,
    what parallelism they switch on (`replicas_only`, `fsdp`, `tensor_parallel`), how a global
    batch splits into micro-batches (`accumulation`, `tokens_per_step`) and its text forms.
    The strategy, the module and `parallelize` ask it; nothing downstream re-derives these.

    Two plans are equal when their dims and activation checkpointing agree; the batch and the
    estimates (bytes per rank by kind, seconds per step by kind, the link each dim crosses,
    throughput, MFU and the rejection, None when feasible) ride along.
    """

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    activation_checkpointing: bool = False
    micro_batch_size: int = field(default=1, compare=False)
    seq_len: int = field(default=1, compare=False)
    global_batch_size: int | None = field(default=None, compare=False)
    memory_breakdown: dict[str, float] = field(default_factory=dict, compare=False)
    time_breakdown: dict[str, float] = field(default_factory=dict, compare=False)
    links: dict[str, str] = field(default_factory=dict, compare=False)
    step_seconds: float = field(default=math.nan, compare=False)
    tokens_per_s: float = field(default=math.nan, compare=False)
    mfu: float = field(default=math.nan, compare=False)
    reason: Rejection | None = field(default=None, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def dim_names(self) -> tuple[str, ...]:
        return MESH_DIMS

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    @property
    def dp_size(self) -> int:
        """Ranks that see different data: each replica's shards."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_size(self) -> int:
        """Ranks FSDP shards parameters over: dp_shard and cp together, as torchtitan does."""
        return self.dp_shard * self.cp

    @property
    def replicas_only(self) -> bool:
        """Plain data parallel over several ranks: each holds the whole model, and torch DDP
        runs it without a device mesh."""
        return self.dp_replicate > 1 and self.shape[1:] == (1, 1, 1)

    @property
    def uses_mesh(self) -> bool:
        """Anything beyond whole-model replicas: the mesh strategy builds the device mesh and
        the model is born sharded on it."""
        return self.world_size > 1 and not self.replicas_only

    @property
    def fsdp(self) -> bool:
        """FSDP2 wraps the model: there is data parallelism on a mesh (over dp_replicate alone
        with tp it only replicates, as HSDP with shards of one)."""
        return self.dp_size > 1 and not self.replicas_only

    @property
    def fsdp_dim_names(self) -> tuple[str, ...]:
        """The mesh dims FSDP2 works over: HSDP's (replicate, shard) pair, or the shard dim."""
        return ("dp_replicate", "dp_shard") if self.dp_replicate > 1 else ("dp_shard",)

    @property
    def tensor_parallel(self) -> bool:
        return self.tp > 1

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (1 when the global batch
        is not set: it is then micro_batch_size x dp size)."""
        if self.global_batch_size is None:
            return 1
        return max(1, self.global_batch_size // (self.micro_batch_size * self.dp_size))

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.seq_len * self.dp_size * self.accumulation

    @property
    def tokens_per_microbatch(self) -> float:
        """Tokens one rank's activations cover: context parallel splits the sequence."""
        return self.micro_batch_size * self.seq_len / self.cp

    @property
    def memory_bytes_per_rank(self) -> float:
        return sum(self.memory_breakdown.values())

    @property
    def feasible(self) -> bool:
        return self.reason is None

    @property
    def mesh_str(self) -> str:
        """The short form, "1x8x1x4" (dims as in `dim_names`)."""
        return "x".join(map(str, self.shape))

    def describe(self) -> str:
        """The long form, "dp_replicate=1 x dp_shard=8 x cp=1 x tp=4", with AC when on."""
        text = " x ".join(f"{n}={s}" for n, s in zip(MESH_DIMS, self.shape, strict=True))
        return text + (", activation checkpointing" if self.activation_checkpointing else "")

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along each dim, in the row-major layout of `init_device_mesh`."""
        coords = {}
        for name, size in reversed(list(zip(MESH_DIMS, self.shape, strict=True))):
            rank, coords[name] = divmod(rank, size)
        return {name: coords[name] for name in MESH_DIMS}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reason"] = str(self.reason) if self.reason else None
        data.update(shape=list(self.shape), dim_names=list(self.dim_names),
                    world_size=self.world_size, memory_bytes_per_rank=self.memory_bytes_per_rank)
        return data
