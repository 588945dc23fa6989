"""Check a plan with the code that will run it, at full scale, in one process.

`validate(run, plan)` starts PyTorch's fake process group at the plan's full world size, builds
the real mesh (`trainer.mesh.build_mesh`) and applies the real `parallelize()` to the model on the
meta device, which holds shapes and no data. Every parameter then carries the layout training would
give it (DTensor placements over named mesh dims), and each rank's parameter bytes follow:

- held: the rank's own shard of each parameter, from DTensor's layout arithmetic at the rank's
  mesh coordinates (`torch.distributed.tensor._utils`), the same function `to_local()` obeys;
- allocated: what the rank's memory actually carries. FSDP2 pads every shard of a parameter to the
  largest one (its first), so the last ranks of an uneven split allocate more than they hold.

The build is done for real at the first and the last rank (where uneven splits leave the fewest
rows), and the arithmetic must reproduce both builds' local shapes and storage sizes exactly;
the other ranks follow from it. Each rank's allocated bytes are compared with the planner's
estimate (`plan.memory_breakdown["params"]`); a deviation over 5%, or any error while building,
fails validation.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Placement, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from trainer.config import ConfigError, RunConfig
from trainer.hardware import GIB
from trainer.models.llama import ModelArgs, Transformer
from trainer.plan import MeshPlan

TOLERANCE = 0.05
FSDP_DIMS = ("dp_shard",)  # the mesh dims FSDP2 shards over (dp_replicate only replicates)


@dataclass(frozen=True)
class Layout:
    """How one parameter is laid out: enough to derive any rank's share of it."""

    name: str
    global_shape: tuple[int, ...]
    itemsize: int
    mesh_dims: tuple[str, ...]  # names of the mesh dims its placements refer to
    mesh_shape: tuple[int, ...]
    placements: tuple[Placement, ...]

    @property
    def fsdp_sharded(self) -> bool:
        # FSDP2 shards dim 0; over a dim tensor parallel already split it is a _StridedShard
        return any(name in FSDP_DIMS and isinstance(p, Shard | _StridedShard)
                   for name, p in zip(self.mesh_dims, self.placements, strict=True))

    @property
    def signature(self) -> tuple:
        """Everything but the name: parameters alike in this share their per-rank sizes."""
        return (self.global_shape, self.itemsize, self.mesh_dims, self.mesh_shape,
                self.placements)

    def held(self, coords: dict[str, int]) -> int:
        """Elements the rank at `coords` holds (its unpadded local shard)."""
        if not self.mesh_dims:
            return math.prod(self.global_shape)
        return _local_numel(self.global_shape, self.mesh_shape,
                            tuple(coords[d] for d in self.mesh_dims), self.placements)

    def allocated(self, coords: dict[str, int]) -> int:
        """Elements the rank allocates: FSDP2 pads each shard to the first shard's size."""
        if not self.fsdp_sharded:
            return self.held(coords)
        return self.held({**coords, **dict.fromkeys(FSDP_DIMS, 0)})


@functools.cache
def _local_numel(global_shape: tuple[int, ...], mesh_shape: tuple[int, ...],
                 coordinate: tuple[int, ...], placements: tuple[Placement, ...]) -> int:
    """DTensor's own rule for the local shard's size (cached: a strided shard's size takes a
    pass over the sharded dim, and alike parameters ask for the same coordinates)."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    shape, _ = _compute_local_shape_and_global_offset(global_shape, mesh_shape, list(coordinate),
                                                      placements, skip_offset=True)
    return math.prod(shape)


@dataclass(frozen=True)
class RankBytes:
    rank: int
    held: int
    allocated: int


@dataclass
class ValidationReport:
    plan: MeshPlan
    dtype: torch.dtype
    estimate: float  # bytes of parameters per rank, the planner's figure
    ranks: list[RankBytes]
    seconds: float
    built_ranks: tuple[int, ...]
    tolerance: float = TOLERANCE

    def deviation(self, rank: RankBytes) -> float:
        return (rank.allocated - self.estimate) / self.estimate

    @property
    def worst(self) -> RankBytes:
        return max(self.ranks, key=lambda r: abs(self.deviation(r)))

    @property
    def ok(self) -> bool:
        return abs(self.deviation(self.worst)) <= self.tolerance

    def render(self) -> str:
        """A few lines: ranks grouped by identical bytes, each group beside the estimate."""
        p = self.plan
        unit, scale = ("GiB", GIB) if self.estimate >= GIB else ("MiB", 2**20)
        lines = [f"validated {p.mesh_str} ({' x '.join(p.dim_names)}) on a fake process group of "
                 f"{p.world_size} ranks in {self.seconds:.1f} s: real mesh and parallelize() on "
                 f"the meta device, {str(self.dtype).removeprefix('torch.')} parameters "
                 f"(built at ranks {', '.join(map(str, self.built_ranks))})",
                 f"{'ranks':<28} {'held ' + unit:>10} {'allocated ' + unit:>14} "
                 f"{'estimate ' + unit:>13} {'deviation':>10}"]
        for (held, allocated), ranks in _group_by_bytes(self.ranks).items():
            deviation = (allocated - self.estimate) / self.estimate
            lines.append(f"{rank_ranges(ranks):<28} {held / scale:>10.3f} "
                         f"{allocated / scale:>14.3f} {self.estimate / scale:>13.3f} "
                         f"{deviation:>+10.1%}")
        worst = self.worst
        verdict = "ok" if self.ok else "FAILED"
        lines.append(f"largest deviation {self.deviation(worst):+.1%} at rank {worst.rank} "
                     f"(limit {self.tolerance:.0%}): {verdict}")
        return "\n".join(lines)


class PlanValidationError(ConfigError):
    """The plan failed validation; `report` holds the per-rank figures when it got that far."""

    def __init__(self, plan: MeshPlan, why: str, report: ValidationReport | None = None):
        super().__init__("parallelism", plan.mesh_str, f"plan.validate: {why}")
        self.report = report


def validate(run: RunConfig, plan: MeshPlan, *, tolerance: float = TOLERANCE) -> ValidationReport:
    """Build `plan` for `run` at full scale with a fake process group and check each rank's
    parameter bytes against the planner's estimate. Raises `PlanValidationError` (a ConfigError)
    when a build fails or a rank deviates by more than `tolerance`."""
    if not run.uses_reference_model:
        raise PlanValidationError(plan, "only the reference decoder can be validated "
                                        f"(model._target_={run.model._target_})")
    start = time.perf_counter()
    dtype = torch.bfloat16 if run.trainer.precision == "bf16-true" else torch.float32
    last = plan.world_size - 1
    built_ranks = (0, last) if last else (0,)
    try:
        builds = {rank: build_layout(run, plan, rank, dtype) for rank in built_ranks}
    except Exception as exc:  # any failure of the real code is the finding
        raise PlanValidationError(plan, f"building the mesh failed: {type(exc).__name__}: "
                                        f"{_first_line(exc)}") from exc
    layouts = [layout for layout, _, _ in builds[0]]
    for rank, build in builds.items():
        check_against_build(plan, rank, build)
    ranks = [rank_bytes(layouts, plan, rank) for rank in range(plan.world_size)]
    report = ValidationReport(plan, dtype, plan.memory_breakdown["params"], ranks,
                              time.perf_counter() - start, built_ranks, tolerance)
    if not report.ok:
        worst = report.worst
        raise PlanValidationError(
            plan, f"rank {worst.rank} allocates {format_bytes(worst.allocated)} of parameters, "
                  f"the planner estimated {format_bytes(report.estimate)} "
                  f"({report.deviation(worst):+.1%}, limit {tolerance:.0%})", report)
    return report


# ------------------------------------------------------------------------------------------------
# Building at one rank


Build = list[tuple[Layout, int, int]]  # (layout, local elements, storage elements) per parameter


def build_layout(run: RunConfig, plan: MeshPlan, rank: int, dtype: torch.dtype) -> Build:
    """Parallelize the meta-device model as `rank` of a fake world and record each parameter's
    layout, local size and storage size."""
    from trainer.mesh import build_mesh
    from trainer.models.parallelize import parallelize

    with fake_world(rank, plan.world_size):
        mesh = build_mesh(plan, "cpu")  # the fake backend moves nothing; the device is moot
        model = meta_model(ModelArgs.from_config(run.model), dtype)
        cfg = _with_checkpointing(run, plan.activation_checkpointing)
        parallelize(model, mesh, cfg, precision=run.trainer.precision)
        return [(_layout_of(name, param), *_local_sizes(param))
                for name, param in model.named_parameters()]


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """The default process group as PyTorch's fake backend: collectives return at once, so one
    process can stand for any rank of any world size."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists; validate in a fresh process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def meta_model(args: ModelArgs, dtype: torch.dtype) -> Transformer:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return Transformer(args)
    finally:
        torch.set_default_dtype(previous)


def _with_checkpointing(run: RunConfig, activation_checkpointing: bool):
    from dataclasses import replace

    # compile is irrelevant to layout and would only wrap the blocks
    return replace(run.parallelism, activation_checkpointing=activation_checkpointing,
                   compile=False)


def _layout_of(name: str, param: torch.Tensor) -> Layout:
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        return Layout(name, tuple(param.shape), param.element_size(),
                      tuple(mesh.mesh_dim_names or ()), tuple(mesh.shape),
                      tuple(param.placements))
    return Layout(name, tuple(param.shape), param.element_size(), (), (), ())


def _local_sizes(param: torch.Tensor) -> tuple[int, int]:
    local = param.to_local() if isinstance(param, DTensor) else param
    return local.numel(), local.untyped_storage().nbytes() // local.element_size()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


# ------------------------------------------------------------------------------------------------
# Every rank from the layouts


def rank_bytes(layouts: Sequence[Layout], plan: MeshPlan, rank: int) -> RankBytes:
    """One rank's parameter bytes. Alike parameters (every block's wq, ...) are sized once."""
    coords = plan.coordinates(rank)
    alike: dict[tuple, list[Layout]] = {}
    for layout in layouts:
        alike.setdefault(layout.signature, []).append(layout)
    held = allocated = 0
    for group in alike.values():
        one = group[0]
        held += len(group) * one.held(coords) * one.itemsize
        allocated += len(group) * one.allocated(coords) * one.itemsize
    return RankBytes(rank, held, allocated)


def check_against_build(plan: MeshPlan, rank: int, build: Build) -> None:
    """The layout arithmetic must give exactly what the real build at `rank` holds."""
    coords = plan.coordinates(rank)
    for layout, local, storage in build:
        expected = (layout.held(coords), layout.allocated(coords))
        if expected != (local, storage):
            raise PlanValidationError(
                plan, f"{layout.name} at rank {rank}: the build holds {local} elements in "
                      f"{storage}, the layout gives {expected[0]} in {expected[1]}")


def _group_by_bytes(ranks: Sequence[RankBytes]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for r in ranks:
        groups.setdefault((r.held, r.allocated), []).append(r.rank)
    return groups


def rank_ranges(ranks: Sequence[int]) -> str:
    """Sorted ranks as short runs: [0, 1, 2, 5] -> "0-2, 5"; an evenly spaced set with a step
    above 1 -> "1-13 step 4"."""
    ranks = sorted(ranks)
    if len(ranks) > 2:
        steps = {b - a for a, b in itertools.pairwise(ranks)}
        if len(steps) == 1 and (step := steps.pop()) > 1:
            return f"{ranks[0]}-{ranks[-1]} step {step}"
    runs: list[str] = []
    start = ranks[0]
    for prev, cur in zip(ranks, [*ranks[1:], None], strict=True):
        if cur is None or cur != prev + 1:  # a run ends at prev
            runs.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    text = ", ".join(runs)
    return text if len(runs) <= 3 else f"{', '.join(runs[:2])}, ... ({len(ranks)} ranks)"


def format_bytes(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.2f} MiB"
