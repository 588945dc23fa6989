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
# Expert parallel is not a factor of the world size: it borrows its ranks from dp_shard, which the
# experts' mesh splits in two (torchtitan's dp_shard_mod_ep x dp_shard_in_ep), ep varying
# fastest. Everything but the experts sees dp_shard whole; the experts are split over "ep" and
# FSDP-sharded over EXPERT_FSDP_DIM. `trainer.models.parallel.expert_mesh` builds it.
EP_DIM = "ep"
EXPERT_FSDP_DIM = "dp_shard_mod_ep"
EP_SPLITS = "dp_shard"


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the mesh dims (`MESH_DIMS`, outermost first), whether blocks are checkpointed,
    and the batch. Two values are equal when their sizes and checkpointing agree."""

    shape: tuple[int, ...]
    activation_checkpointing: bool = False
    micro_batch_size: int = field(default=1, compare=False)
    seq_len: int = field(default=1, compare=False)
    global_batch_size: int | None = field(default=None, compare=False)
    ep: int = 1  # expert parallel, inside dp_shard (`EP_SPLITS`)

    def __post_init__(self) -> None:
        if len(self.shape) != len(MESH_DIMS) or min(self.shape) < 1:
            raise ValueError(f"a mesh has {len(MESH_DIMS)} positive sizes "
                             f"({', '.join(MESH_DIMS)}), got {self.shape}")
        if self.ep < 1 or self.size(EP_SPLITS) % self.ep:
            raise ValueError(f"{EP_DIM}={self.ep} must divide {EP_SPLITS}={self.size(EP_SPLITS)}")

    @classmethod
    def of(cls, sizes: Mapping[str, int], **kwargs) -> ParallelDims:
        """From sizes by name (`ep` among them); dims not named are 1."""
        unknown = set(sizes) - {*MESH_DIMS, EP_DIM}
        if unknown:
            raise ValueError(f"not mesh dims: {', '.join(sorted(unknown))}")
        return cls(tuple(sizes.get(name, 1) for name in MESH_DIMS),
                   ep=sizes.get(EP_DIM, 1), **kwargs)

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
    def expert_parallel(self) -> bool:
        return self.ep > 1

    @property
    def split_sizes(self) -> dict[str, int]:
        """The sizes of every dim that may split a parameter before FSDP shards it: the mesh
        dims, and ep (which divides the experts)."""
        return {**self.sizes, EP_DIM: self.ep}

    @property
    def expert_mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Sizes and names of the experts' mesh: dp_shard split into (EXPERT_FSDP_DIM, ep)."""
        sizes = self.sizes
        at = MESH_DIMS.index(EP_SPLITS)
        outer = (sizes[EP_SPLITS] // self.ep, self.ep)
        return ((*self.shape[:at], *outer, *self.shape[at + 1:]),
                (*MESH_DIMS[:at], EXPERT_FSDP_DIM, EP_DIM, *MESH_DIMS[at + 1:]))

    def fsdp_size_of(self, split: tuple[str, ...]) -> int:
        """Ranks FSDP shards a parameter over when `split` names the dims that already divide it:
        what ep takes of dp_shard is not FSDP's."""
        return self.fsdp_size // (self.ep if EP_DIM in split else 1)

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
        """The short form, "1x8x1x4" (dims as in `dim_names`), "1x8x1x4 ep4" with experts split."""
        return "x".join(map(str, self.shape)) + (f" {EP_DIM}{self.ep}" if self.ep > 1 else "")

    def describe(self) -> str:
        """The long form, "dp_replicate=1 x dp_shard=8 x cp=1 x tp=4", with ep and AC when on."""
        text = " x ".join(f"{n}={s}" for n, s in self.sizes.items())
        if self.ep > 1:
            text += f", {EP_DIM}={self.ep} (of {EP_SPLITS})"
        return text + (", activation checkpointing" if self.activation_checkpointing else "")

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along each dim, in the row-major layout of `init_device_mesh`."""
        coords = {}
        for name, size in reversed(self.sizes.items()):
            rank, coords[name] = divmod(rank, size)
        return {name: coords[name] for name in MESH_DIMS}

    def all_coordinates(self, rank: int) -> dict[str, int]:
        """`coordinates`, and the rank's index along the experts' mesh dims
        (`expert_mesh_shape`: ep varies fastest inside dp_shard)."""
        coords = self.coordinates(rank)
        coords[EXPERT_FSDP_DIM], coords[EP_DIM] = divmod(coords[EP_SPLITS], self.ep)
        return coords

    def to_dict(self) -> dict:
        return {**self.sizes, EP_DIM: self.ep, "shape": list(self.shape),
                "dim_names": list(MESH_DIMS), "world_size": self.world_size,
                "activation_checkpointing": self.activation_checkpointing,
                "micro_batch_size": self.micro_batch_size, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size}
