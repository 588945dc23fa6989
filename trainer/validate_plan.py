"""Check a plan with the code that will run it, at full scale, in one process.

`validate(run, chosen)` starts PyTorch's fake process group at the plan's full world size, builds
the real mesh (`trainer.mesh.build_mesh`) and the module exactly as the trainer does
(`trainer.module.build_module`, then its own `configure_model`: meta device, `parallelize()`,
shards allocated under `FakeTensorMode`, which holds shapes and no data). Two checks follow.

1. Parameter bytes of every rank. Each parameter carries the layout training gives it (DTensor
   placements over named mesh dims), and each rank's bytes follow from DTensor's own layout
   arithmetic at the rank's coordinates (`torch.distributed.tensor._utils`):
   - held: the rank's own shard of each parameter;
   - allocated: what its memory carries; FSDP2 pads every shard of a parameter to the largest
     one (its first), so the last ranks of an uneven split allocate more than they hold.
   The module is built for real at the first and the last rank (where uneven splits leave the
   fewest rows), and the arithmetic must reproduce both builds' local shapes and storage sizes
   exactly; each rank's allocated bytes must be within 5% of the planner's `params` figure.
2. One training step at rank 0 (the largest shards): forward, loss, backward, the module's
   gradient clipping and the optimizer step, under the precision plugin's contexts, all under
   `FakeTensorMode`; forward and backward under torch's memory tracker (`FSDPMemTracker` when
   FSDP2 wraps the model, `MemTracker` otherwise). The tracked bytes at the step's peak, by
   component (parameters, gradients, optimizer states, activations, communication buffers),
   stand beside the planner's estimate of each; the peak total must be within 15% of the
   planner's total.

Why 15%: the planner's figure is what decides whether a plan fits in `memory_headroom` (90%) of a
rank's memory, so an estimate 15% low still leaves a plan that fits on paper short by at most a
few percent of the device's memory, which the allocator's own slack absorbs; a larger miss means
the model's memory formula is wrong for this plan. What the tracker cannot see (the allocator's
fragmentation, the runtime's and the communication library's own buffers) is what the headroom is
for, on either side.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from trainer.config import KEY, ConfigError, RunConfig
from trainer.hardware import GIB
from trainer.plan import Candidate, ParallelDims
from trainer.plan.dims import EXPERT_FSDP_DIM

TOLERANCE = 0.05  # parameter bytes: pure layout arithmetic, only FSDP's padding moves it
STEP_TOLERANCE = 0.15  # the step's peak against the planner's total (module doc: why)
# the mesh dims FSDP2 shards over (dp_replicate only replicates): dp_shard, and for routed
# experts what expert parallel leaves of it
FSDP_DIMS = ("dp_shard", EXPERT_FSDP_DIM)


@dataclass(frozen=True)
class ParamLayout:
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


# Planner components (`trainer.plan.planner.memory_breakdown`) under the names the report uses.
COMPONENTS = {
    "parameters": ("params",),
    "gradients": ("grads",),
    "optimizer states": ("optimizer",),
    "activations": ("activations", "logits"),
    "buffers": ("fsdp_buffers", "ddp_buckets", "autocast_weights"),
}


@dataclass(frozen=True)
class StepMemory:
    """Bytes the memory tracker saw at the peak of one training step, by report component."""

    rank: int
    measured: dict[str, float]
    estimated: dict[str, float]
    without_checkpointing: bool = False  # measured and estimated without it (`step_candidate`)

    @property
    def peak(self) -> float:
        return sum(self.measured.values())

    @property
    def estimate(self) -> float:
        return sum(self.estimated.values())

    @property
    def deviation(self) -> float:
        return (self.peak - self.estimate) / self.estimate


@dataclass
class ValidationReport:
    dims: ParallelDims
    dtype: torch.dtype
    estimate: float  # bytes of parameters per rank, the planner's figure
    ranks: list[RankBytes]
    seconds: float
    built_ranks: tuple[int, ...]
    step: StepMemory | None = None
    tolerance: float = TOLERANCE
    step_tolerance: float = STEP_TOLERANCE

    def deviation(self, rank: RankBytes) -> float:
        return (rank.allocated - self.estimate) / self.estimate

    @property
    def worst(self) -> RankBytes:
        return max(self.ranks, key=lambda r: abs(self.deviation(r)))

    @property
    def params_ok(self) -> bool:
        return abs(self.deviation(self.worst)) <= self.tolerance

    @property
    def step_ok(self) -> bool:
        return self.step is None or abs(self.step.deviation) <= self.step_tolerance

    @property
    def ok(self) -> bool:
        return self.params_ok and self.step_ok

    def render(self) -> str:
        """Parameter bytes by groups of ranks with identical bytes, then the step's memory by
        component, each beside the planner's estimate."""
        p = self.dims
        unit, scale = ("GiB", GIB) if self.estimate >= GIB else ("MiB", 2**20)
        lines = [f"validated {p.mesh_str} ({' x '.join(p.dim_names)}) on a fake process group of "
                 f"{p.world_size} ranks in {self.seconds:.1f} s: the module's own "
                 f"configure_model, {str(self.dtype).removeprefix('torch.')} parameters "
                 f"(built at ranks {', '.join(map(str, self.built_ranks))})",
                 f"{'ranks':<28} {'held ' + unit:>10} {'allocated ' + unit:>14} "
                 f"{'estimate ' + unit:>13} {'deviation':>10}"]
        for (held, allocated), ranks in _group_by_bytes(self.ranks).items():
            deviation = (allocated - self.estimate) / self.estimate
            lines.append(f"{rank_ranges(ranks):<28} {held / scale:>10.3f} "
                         f"{allocated / scale:>14.3f} {self.estimate / scale:>13.3f} "
                         f"{deviation:>+10.1%}")
        worst = self.worst
        lines.append(f"largest deviation {self.deviation(worst):+.1%} at rank {worst.rank} "
                     f"(limit {self.tolerance:.0%}): {'ok' if self.params_ok else 'FAILED'}")
        if self.step is not None:
            lines += self._render_step(self.step)
        return "\n".join(lines)

    def _render_step(self, step: StepMemory) -> list[str]:
        unit, scale = ("GiB", GIB) if step.estimate >= GIB else ("MiB", 2**20)
        how = (" without activation checkpointing (FakeTensorMode keeps recomputed blocks alive "
               "under FSDP2), against the estimate without it" if step.without_checkpointing
               else "")
        lines = [f"one training step at rank {step.rank} under FakeTensorMode (forward, "
                 f"backward, clipping, optimizer step){how}, memory at its peak:",
                 f"{'component':<28} {'measured ' + unit:>14} {'estimate ' + unit:>14} "
                 f"{'deviation':>10}"]
        for name in (*COMPONENTS, "peak"):
            measured = step.peak if name == "peak" else step.measured[name]
            estimated = step.estimate if name == "peak" else step.estimated[name]
            deviation = f"{(measured - estimated) / estimated:>+10.1%}" if estimated else "-"
            lines.append(f"{name:<28} {measured / scale:>14.3f} {estimated / scale:>14.3f} "
                         f"{deviation:>10}")
        lines.append(f"peak deviation {step.deviation:+.1%} (limit {self.step_tolerance:.0%}): "
                     f"{'ok' if self.step_ok else 'FAILED'}")
        return lines


class PlanValidationError(ConfigError):
    """The plan failed validation; `report` holds the per-rank figures when it got that far."""

    def __init__(self, dims: ParallelDims, why: str, report: ValidationReport | None = None):
        super().__init__(KEY.parallelism, dims.mesh_str, f"{KEY.plan.validate}: {why}")
        self.report = report


def validate(run: RunConfig, chosen: Candidate, *, tolerance: float = TOLERANCE,
             step: bool = True) -> ValidationReport:
    """Build `chosen` for `run` at full scale with a fake process group, through the module's own
    `configure_model`, check each rank's parameter bytes against the planner's estimate and,
    with `step`, one training step's memory at rank 0. Raises `PlanValidationError` (a
    ConfigError) when a build or the step fails or a figure is past its tolerance."""
    start = time.perf_counter()
    dims = chosen.dims
    last = dims.world_size - 1
    built_ranks = (0, last) if last else (0,)
    builds: dict[int, Build] = {}
    measured: StepMemory | None = None
    stepped = step_candidate(run, chosen)
    try:
        for rank in built_ranks:
            with_step = step and rank == 0
            builds[rank], step_memory = build_and_step(
                run, stepped if with_step else chosen, rank, step=with_step)
            measured = measured or step_memory
    except PlanValidationError:
        raise
    except Exception as exc:  # any failure of the real code is the finding
        raise PlanValidationError(dims, f"building or stepping the module failed: "
                                        f"{type(exc).__name__}: {_first_line(exc)}") from exc
    checkpointed = dims.activation_checkpointing
    if measured is not None and stepped.dims.activation_checkpointing != checkpointed:
        measured = dataclasses.replace(measured, without_checkpointing=True)
    layouts = [layout for layout, _, _ in builds[0]]
    for rank, build in builds.items():
        check_against_build(dims, rank, build)
    ranks = [rank_bytes(layouts, dims, rank) for rank in range(dims.world_size)]
    dtype = _dtype_of(layouts)
    report = ValidationReport(dims, dtype, chosen.estimate.memory["params"], ranks,
                              time.perf_counter() - start, built_ranks, measured, tolerance)
    if not report.params_ok:
        worst = report.worst
        raise PlanValidationError(
            dims, f"rank {worst.rank} allocates {format_bytes(worst.allocated)} of parameters, "
                  f"the planner estimated {format_bytes(report.estimate)} "
                  f"({report.deviation(worst):+.1%}, limit {tolerance:.0%})", report)
    if not report.step_ok and measured is not None:
        raise PlanValidationError(
            dims, f"one training step at rank 0 peaks at {format_bytes(measured.peak)}, the "
                  f"planner estimated {format_bytes(measured.estimate)} "
                  f"({measured.deviation:+.1%}, limit {report.step_tolerance:.0%})", report)
    return report


def step_candidate(run: RunConfig, chosen: Candidate) -> Candidate:
    """The candidate whose step is measured: `chosen` itself, except where activation checkpointing
    meets FSDP2. Under FakeTensorMode the blocks' recomputed activations are then never freed
    (seen with torch 2.13: 8 checkpointed blocks of dim 1024 over 2 ranks hold 0.70 GiB of
    activations fake, 0.33 GiB in a real 2-process gloo run of the same module; without FSDP2,
    fake and real agree), so the step is measured without checkpointing and compared with the
    planner's estimate for the same mesh without it. What checkpointing itself saves (each block
    keeps its input) is measured on two real processes by tests/test_validate_plan.py.

    Routed experts: fake tensors hold no routing, so the fake step sends every expert its mean
    share of tokens (`trainer.models.moe.experts`), and its estimate is the planner's at
    plan.expert_load=1."""
    from trainer.plan import RunFacts, evaluate

    even = chosen.dims.expert_parallel and run.plan.expert_load != 1
    if not (chosen.dims.activation_checkpointing and chosen.dims.fsdp) and not even:
        return chosen
    if even:
        run = dataclasses.replace(run, plan=dataclasses.replace(run.plan, expert_load=1.0))
    ac = chosen.dims.activation_checkpointing and not chosen.dims.fsdp
    return evaluate(RunFacts.of(run), chosen.dims.shape, ac, chosen.dims.ep)


# ------------------------------------------------------------------------------------------------
# Building at one rank


# (layout, local elements, storage elements) per parameter
Build = list[tuple[ParamLayout, int, int]]


def build_and_step(run: RunConfig, chosen: Candidate, rank: int, *,
                   step: bool) -> tuple[Build, StepMemory | None]:
    """The module as `rank` of a fake world builds it (the trainer's own calls: the mesh, the
    module, the precision plugin's init context, `configure_model`), each parameter's layout
    and sizes, and with `step` the memory of one training step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.mesh import build_mesh
    from trainer.module import build_module, precision_plugin

    dims = chosen.dims
    with fake_world(rank, dims.world_size):
        mesh = build_mesh(dims, "cpu")  # the fake backend moves nothing; the device is moot
        module = build_module(run, dims)
        module._device_mesh = mesh  # what the mesh strategy hands the module before the hook
        precision = precision_plugin(run, device_type="cpu")
        # The hook runs as the trainer runs it, on the meta device: parallelize() needs real
        # (meta) tensors, as FSDP2's sharding of tensor-parallel DTensors does not run on fake
        # ones. The shards are then allocated as fake tensors, as `to_empty` would allocate them.
        with torch.device("meta"), precision.module_init_context():
            module.configure_model()
        model = _model_of(module)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            build = [(_layout_of(name, param), *_local_sizes(param))
                     for name, param in model.named_parameters()]
            memory = (measure_step(run, chosen, module, model, precision, rank) if step
                      else None)
        return build, memory


def measure_step(run: RunConfig, chosen: Candidate, module, model: torch.nn.Module, precision,
                 rank: int) -> StepMemory:
    """Memory of a steady-state training step of `module` on a micro-batch of fake tokens:
    optimizer states already allocated (as from the second step on), then forward, loss,
    backward and the module's gradient clipping under the memory tracker; the bytes at its peak
    by component beside the planner's.

    Gradient clipping and the optimizer's update run outside the tracker, for one reason: under
    FakeTensorMode the tracker books the outputs of foreach ops on DTensors at their global
    size. Clipping (in place, scalar norms) is booked at the model's full fp32 size, 366 MiB for
    a 4-rank fsdp x tp model whose real gloo run books 0 MiB; on the 70B recipe that phantom
    was the step's peak. Foreach AdamW's temporaries are booked at tens of times the states'
    size, which real runs (torchtitan's FSDP2 recipes use the same optimizer) do not show. Both
    still run (a failure is a finding); the states are counted from the optimizer itself."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    optimizer = _optimizer_of(module.configure_optimizers())
    _allocate_states(optimizer)
    shape = (run.data.micro_batch_size, run.data.seq_len)
    vocab = run.model.vocab_size
    batch: tuple[torch.Tensor, ...] = (torch.randint(vocab, shape), torch.randint(vocab, shape))
    if run.uses_document_mask:  # the batches carry documents: attention keeps the mask
        batch += (torch.zeros(shape, dtype=torch.int32),)
    if isinstance(model, FSDPModule):
        tracker = FSDPMemTracker(model)
        tracker.track_inputs(batch)
    else:
        tracker = MemTracker()
        tracker.track_external(model, *batch)
    with tracker:
        with precision.forward_context():
            loss = module.training_step(batch, 0)
        loss.backward()
    module.configure_gradient_clipping(optimizer)
    optimizer.step()
    optimizer.zero_grad()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    measured = _by_component({str(getattr(kind, "value", kind)): nbytes
                              for kind, nbytes in peak.items()})
    measured["optimizer states"] = float(_state_bytes(optimizer))
    return StepMemory(rank, measured, {
        name: sum(chosen.estimate.memory.get(part, 0.0) for part in parts)
        for name, parts in COMPONENTS.items()})


def _allocate_states(optimizer: torch.optim.Optimizer) -> None:
    """Let the optimizer create its states, as its first step does, with zero gradients."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank's optimizer states take (each DTensor's local shard)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.ndim:
                local = value.to_local() if isinstance(value, DTensor) else value
                total += local.numel() * local.element_size()
    return total


# The tracker's categories (MemTracker's and FSDPMemTracker's reference types) by component.
_TRACKED = {
    "parameters": ("Parameter", "Sharded Param", "Buffer"),
    "gradients": ("Gradient", "Sharded Grad"),
    "activations": ("Activation", "Temp", "Inputs", "Other"),
    "buffers": ("Unsharded Param", "Unsharded Grad", "All Gather", "Reduce Scatter"),
}


def _by_component(snapshot: dict[str, int]) -> dict[str, float]:
    return {name: float(sum(snapshot.get(kind, 0) for kind in kinds))
            for name, kinds in _TRACKED.items()}


def _model_of(module) -> torch.nn.Module:
    """The parameters' owner: the reference module keeps its decoder as `.model`; a user's
    module is its own."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def _optimizer_of(configured) -> torch.optim.Optimizer:
    """The first optimizer of whatever `configure_optimizers` returned (Lightning's forms)."""
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    if isinstance(configured, list | tuple):
        first = configured[0]
        return _optimizer_of(first) if isinstance(first, dict | list | tuple) else first
    return configured


def _dtype_of(layouts: Sequence[ParamLayout]) -> torch.dtype:
    widths = {layout.itemsize for layout in layouts}
    return torch.bfloat16 if widths == {2} else torch.float32


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


def _layout_of(name: str, param: torch.Tensor) -> ParamLayout:
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        return ParamLayout(name, tuple(param.shape), param.element_size(),
                      tuple(mesh.mesh_dim_names or ()), tuple(mesh.shape),
                      tuple(param.placements))
    return ParamLayout(name, tuple(param.shape), param.element_size(), (), (), ())


def _local_sizes(param: torch.Tensor) -> tuple[int, int]:
    local = param.to_local() if isinstance(param, DTensor) else param
    return local.numel(), local.untyped_storage().nbytes() // local.element_size()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


# ------------------------------------------------------------------------------------------------
# Every rank from the layouts


def rank_bytes(layouts: Sequence[ParamLayout], dims: ParallelDims, rank: int) -> RankBytes:
    """One rank's parameter bytes. Alike parameters (every block's wq, ...) are sized once."""
    coords = dims.all_coordinates(rank)
    alike: dict[tuple, list[ParamLayout]] = {}
    for layout in layouts:
        alike.setdefault(layout.signature, []).append(layout)
    held = allocated = 0
    for group in alike.values():
        one = group[0]
        held += len(group) * one.held(coords) * one.itemsize
        allocated += len(group) * one.allocated(coords) * one.itemsize
    return RankBytes(rank, held, allocated)


def check_against_build(dims: ParallelDims, rank: int, build: Build) -> None:
    """The layout arithmetic must give exactly what the real build at `rank` holds."""
    coords = dims.all_coordinates(rank)
    for layout, local, storage in build:
        expected = (layout.held(coords), layout.allocated(coords))
        if expected != (local, storage):
            raise PlanValidationError(
                dims, f"{layout.name} at rank {rank}: the build holds {local} elements in "
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
