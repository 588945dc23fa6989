"""`ParallelDims`: a run's ranks as named mesh dims, the batch they carry and what they switch on.

The value the strategy, the module and a family's `parallelize` read (torchtitan's
`ParallelDims`): the mesh's sizes, what parallelism they switch on (`replicas_only`, `fsdp`,
`tensor_parallel`), how a global batch splits into micro-batches (`accumulation`,
`tokens_per_step`) and its text forms. Arithmetic only, generic over `MESH_DIMS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from trainer.config import MESH_DIMS

# FSDP2 shards parameters over these dims together (torchtitan's dp_shard x cp).
FSDP_DIMS = ("dp_shard", "cp")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the mesh dims (`MESH_DIMS`, outermost first), whether blocks are checkpointed,
    and the batch. Two values are equal when their sizes and checkpointing agree."""

    shape: tuple[int, ...]
    activation_checkpointing: bool = False
    micro_batch_size: int = field(default=1, compare=False)
    seq_len: int = field(default=1, compare=False)
    global_batch_size: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.shape) != len(MESH_DIMS) or min(self.shape) < 1:
            raise ValueError(f"a mesh has {len(MESH_DIMS)} positive sizes "
                             f"({', '.join(MESH_DIMS)}), got {self.shape}")

    @classmethod
    def of(cls, sizes: Mapping[str, int], **kwargs) -> ParallelDims:
        """From sizes by name; dims not named are 1."""
        unknown = set(sizes) - set(MESH_DIMS)
        if unknown:
            raise ValueError(f"not mesh dims: {', '.join(sorted(unknown))}")
        return cls(tuple(sizes.get(name, 1) for name in MESH_DIMS), **kwargs)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(MESH_DIMS, self.shape, strict=True))

    def size(self, name: str) -> int:
        return self.shape[MESH_DIMS.index(name)]

    @property
    def dp_replicate(self) -> int:
        return self.size("dp_replicate")

    @property
    def dp_shard(self) -> int:
        return self.size("dp_shard")

    @property
    def cp(self) -> int:
        return self.size("cp")

    @property
    def tp(self) -> int:
        return self.size("tp")

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
        """Ranks FSDP shards parameters over."""
        return math.prod(self.size(name) for name in FSDP_DIMS)

    @property
    def replicas_only(self) -> bool:
        """Plain data parallel over several ranks: each holds the whole model, and torch DDP
        runs it without a device mesh."""
        return self.dp_replicate > 1 and self.world_size == self.dp_replicate

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
    def mesh_str(self) -> str:
        """The short form, "1x8x1x4" (dims as in `dim_names`)."""
        return "x".join(map(str, self.shape))

    def describe(self) -> str:
        """The long form, "dp_replicate=1 x dp_shard=8 x cp=1 x tp=4", with AC when on."""
        text = " x ".join(f"{n}={s}" for n, s in self.sizes.items())
        return text + (", activation checkpointing" if self.activation_checkpointing else "")

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along each dim, in the row-major layout of `init_device_mesh`."""
        coords = {}
        for name, size in reversed(self.sizes.items()):
            rank, coords[name] = divmod(rank, size)
        return {name: coords[name] for name in MESH_DIMS}

    def to_dict(self) -> dict:
        return {**self.sizes, "shape": list(self.shape), "dim_names": list(MESH_DIMS),
                "world_size": self.world_size,
                "activation_checkpointing": self.activation_checkpointing,
                "micro_batch_size": self.micro_batch_size, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size}
