"""The planner: how a run's ranks split into named mesh dims, and whether it fits.

A plan factors the world size (cluster.nodes x ranks per node) into the mesh dims, outermost
first (`trainer.config.MESH_DIMS`):

    dp_replicate x dp_shard x cp x tp

laid out row-major, so `tp` varies fastest. torchrun numbers ranks node-major (rank = node x
ranks_per_node + local_rank), and `init_device_mesh(device, dims.shape, mesh_dim_names=
dims.dim_names)` lays ranks out row-major, so a tp group is `tp` consecutive ranks: inside one
node whenever tp divides the ranks of a node. dp_shard (FSDP) comes next and stays inside an
UltraServer / NVLink domain while the domain is big enough; dp_replicate is outermost and is the
one dim that crosses domains.

Everything here is arithmetic on the config: no torch.distributed, no devices. The model's own
figures (parameters by how they shard, FLOPs, activation bytes, tensor-parallel traffic) come
from its family (`trainer.models.registry.model_costs`); the planner adds what every model shares:
optimizer states, FSDP and DDP buffers, the loss's working set, the links each dim crosses and
the step time. For each candidate it estimates the bytes one rank holds (`memory_breakdown`) and
the time of one optimizer step (`step_time`); the formulas and what they assume are in those
functions' docstrings. Explicit plans are checked and rejected with the reason;
`parallelism=auto` picks the fastest feasible one.

    python -m trainer.plan [--all] [hydra overrides]   # table of candidates; see --help
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product

import trainer.plan.precision as lowp
from trainer.config import KEY, MESH_DIMS, PRECISION_AUTO, ConfigError, RunConfig
from trainer.hardware import GIB, HardwareSpec, Link
from trainer.models.family import (
    ModelCosts,
    ParamCounts,
    ParamGroup,
    Widths,
    ring_allreduce,
    ring_gather,
)
from trainer.models.registry import model_costs
from trainer.plan.dims import EP_DIM, EP_SPLITS, FSDP_DIMS, ParallelDims
from trainer.plan.rejection import Rejection
from trainer.plan.xla import rejection as xla_rejection
from trainer.plan.xla import step_time as xla_step_time

# Dtype widths in bytes. Mixed precision computes in 16 bits; "32-true" computes in fp32, which
# the hardware spec counts against its bf16 peak.
_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}
# fp8 / mxfp8 are bf16-mixed apart from the matmuls they convert (`trainer.plan.precision`).
_MIXED = ("bf16-mixed", "16-mixed", "fp8", "mxfp8")
_FP32_LOSS_BYTES = 4 + 4  # cross_entropy's fp32 log-softmax output, and its gradient
# Activation checkpointing recomputes each block's forward during backward: one more forward on
# top of forward + backward (2 + 4 FLOPs per weight and token), so 8/6 of the work.
_RECOMPUTE_FACTOR = 8 / 6
# Plans whose estimated throughput agrees to this many significant digits are a tie.
_TIE_DIGITS = 6
# Dims that exist in the mesh's vocabulary but not yet in the trainer: they must stay 1.
NOT_IMPLEMENTED = {"cp": "context parallel is not implemented yet; use 1"}


@dataclass(frozen=True)
class Estimate:
    """What the planner expects of one `ParallelDims`: bytes per rank by kind, seconds per step
    by kind, the link each dim crosses, throughput and MFU, and the rejection (None: it fits)."""

    memory: dict[str, float]
    time: dict[str, float]
    links: dict[str, Link]
    tokens_per_s: float
    mfu: float
    rejection: Rejection | None = None

    @property
    def memory_bytes_per_rank(self) -> float:
        return sum(self.memory.values())

    @property
    def step_seconds(self) -> float:
        return self.time["step"]

    def to_dict(self) -> dict:
        return {"memory_breakdown": self.memory, "time_breakdown": self.time,
                "links": self.links, "memory_bytes_per_rank": self.memory_bytes_per_rank,
                "step_seconds": self.step_seconds, "tokens_per_s": self.tokens_per_s,
                "mfu": self.mfu, "reason": str(self.rejection) if self.rejection else None}


@dataclass(frozen=True)
class Candidate:
    """A mesh the planner considered, with its estimate and the trainer.precision it assumed
    (auto's choice). Equal when the dims are."""

    dims: ParallelDims
    estimate: Estimate = field(compare=False)
    precision: str = field(default="", compare=False)

    @property
    def feasible(self) -> bool:
        return self.estimate.rejection is None

    @property
    def reason(self) -> Rejection | None:
        return self.estimate.rejection

    def to_dict(self) -> dict:
        return {**self.dims.to_dict(), **self.estimate.to_dict(), "precision": self.precision}


# ---------------------------------------------------------------------------------------------
# What the planner knows about a run, derived once


@dataclass(frozen=True)
class Topology:
    """Where node and domain boundaries fall in torchrun's node-major rank numbering."""

    world: int
    ranks_per_node: int
    ranks_per_domain: int

    def link(self, span: int, stride: int) -> Link:
        """The slowest link a dim with `span` members `stride` ranks apart crosses.

        Row-major layout puts each group of the dim inside an aligned block of span x stride
        ranks. The group stays inside a node (domain) iff that block does, that is iff the block
        divides the node (domain) size, or the whole world fits in one. Unlike
        `HardwareSpec.link_between` this sees misaligned blocks (tp=3 on 8-rank nodes) and uses
        the run's ranks per node, which `trainer.devices` may set below the hardware's.
        """
        if span == 1:
            return "node"
        block = span * stride
        if self.world <= self.ranks_per_node or self.ranks_per_node % block == 0:
            return "node"
        if self.world <= self.ranks_per_domain or self.ranks_per_domain % block == 0:
            return "domain"
        return "inter"


@dataclass(frozen=True)
class RunFacts:
    """The parts of a run the estimates read, derived once per `candidates()` call."""

    run: RunConfig
    hardware: HardwareSpec
    costs: ModelCosts
    params: ParamCounts
    topology: Topology

    @classmethod
    def of(cls, run: RunConfig) -> RunFacts:
        costs = model_costs(run)
        hardware = HardwareSpec(run.hardware)
        topology = Topology(run.world_size, run.ranks_per_node,
                            run.ranks_per_node * run.hardware.nodes_per_domain)
        return cls(run, hardware, costs, costs.param_counts(), topology)

    def dims(self, shape: tuple[int, ...], activation_checkpointing: bool,
             ep: int = 1) -> ParallelDims:
        """`shape` (and `ep`) carrying this run's batch."""
        d = self.run.data
        return ParallelDims(tuple(shape), activation_checkpointing,
                            micro_batch_size=d.micro_batch_size, seq_len=d.seq_len,
                            global_batch_size=d.global_batch_size, ep=ep)

    @property
    def has_experts(self) -> bool:
        """The model has routed experts: expert parallel is one of its dims."""
        return hasattr(self.costs, "ep_rejection")


def widths(run: RunConfig, dims: ParallelDims) -> Widths:
    """Bytes per element of each kind of tensor under the run's precision and FSDP dtypes (what
    each width means: `trainer.models.family.Widths`)."""
    precision, p = run.trainer.precision, run.parallelism
    master = 2 if precision == "bf16-true" else 4
    fsdp_casts = dims.fsdp and p.param_dtype is not None
    precision_compute = 4 if precision == "32-true" else 2
    compute = _WIDTH[p.param_dtype] if fsdp_casts else precision_compute
    residual = compute if fsdp_casts or precision == "bf16-true" else 4
    gather = _WIDTH[p.param_dtype] if p.param_dtype else master
    reduce = _WIDTH[p.reduce_dtype] if p.reduce_dtype else gather
    return Widths(master, compute, residual, gather, reduce,
                  autocast_copies=precision in _MIXED and not fsdp_casts)


# ---------------------------------------------------------------------------------------------
# Estimates


def dim_links(topology: Topology, shape: tuple[int, ...], ep: int = 1) -> dict[str, Link]:
    """The link each mesh dim crosses, the FSDP group's ("fsdp": the FSDP dims together, which
    are adjacent in the mesh), expert parallel's ("ep": the innermost ep ranks of dp_shard) and
    the experts' FSDP group's ("expert_fsdp": what ep leaves of dp_shard)."""
    sizes = dict(zip(MESH_DIMS, shape, strict=True))
    links: dict[str, Link] = {}
    stride = 1
    for name in reversed(MESH_DIMS):
        links[name] = topology.link(sizes[name], stride)
        stride *= sizes[name]
    inner = MESH_DIMS[MESH_DIMS.index(FSDP_DIMS[-1]) + 1:]
    links["fsdp"] = topology.link(math.prod(sizes[d] for d in FSDP_DIMS),
                                  math.prod(sizes[d] for d in inner))
    below_ep = math.prod(sizes[d] for d in MESH_DIMS[MESH_DIMS.index(EP_SPLITS) + 1:])
    links[EP_DIM] = topology.link(ep, below_ep)
    links["expert_fsdp"] = topology.link(sizes[EP_SPLITS] // ep, ep * below_ep)
    return {name: links[name] for name in (*MESH_DIMS, "fsdp", EP_DIM, "expert_fsdp")}


def fsdp_local(params: ParamCounts, dims: ParallelDims, *, split_only: str | None = None,
               exclude: str | None = None) -> float:
    """Elements of `params` one rank stores: each group split by its dims, then sharded by FSDP
    over what of the FSDP ranks its split dims leave (ep takes its share of dp_shard). With
    `split_only` or `exclude`, only the groups split (or not split) by that dim."""
    sizes = dims.split_sizes
    return sum(g.local(sizes) / dims.fsdp_size_of(g.split) for g in params.groups
               if (split_only is None or split_only in g.split)
               and (exclude is None or exclude not in g.split))


def memory_breakdown(facts: RunFacts, dims: ParallelDims) -> dict[str, float]:
    """Peak bytes one rank holds, by kind. Framework overhead (CUDA/Neuron runtime, allocator
    fragmentation, communication buffers) is what plan.memory_headroom leaves room for.

    params, grads, optimizer: the stored parameters, their gradients and AdamW's exp_avg and
        exp_avg_sq, all in the master dtype (`Widths`), 16 bytes per parameter in fp32
        (Rajbhandari et al. 2020, ZeRO, sec. 3.1). The family says which dims split which
        parameters (tp splits the matmul weights, not the norms); FSDP (dp_shard x cp) splits
        everything; dp_replicate holds full copies.
    autocast_weights: 16-bit copies of every local matmul weight that autocast keeps for the
        forward pass (see `Widths.autocast_copies`); FSDP does not shard them.
    fsdp_buffers: with FSDP, the unsharded parameters of the unit being computed and the next
        one (prefetched) in the gather dtype, and one unit's unsharded gradients before
        reduce-scatter in the reduce dtype.
    ddp_buckets: plain data parallel (replicas only, run by torch DDP) copies the gradients into
        its all-reduce buckets (gradient_as_bucket_view is off by default).
    activations: the family's bytes per token (`ModelCosts.activation_bytes_per_token`, plus
        `document_mask_bytes_per_token` when attention is masked by document) for the tokens one
        rank holds; logits: see `logits_bytes`. Under expert parallel, the part of them that
        lands on whichever rank holds a token's expert (`routed_bytes_per_token`) grows by
        plan.expert_load - 1 on the busiest rank (routing is dropless).
    Routed experts are split over ep (which borrows ep of dp_shard's ranks) and sharded by FSDP
    over the rest of dp_shard (`fsdp_local`).
    """
    w = widths(facts.run, dims)
    p, sizes = facts.params, dims.split_sizes
    local = fsdp_local(p, dims)
    unit = p.largest_unit(sizes)
    activations = facts.costs.activation_bytes_per_token(
        w, tp=dims.tp, sequence_parallel=facts.run.parallelism.sequence_parallel,
        checkpointing=dims.activation_checkpointing)
    if facts.run.uses_document_mask:
        activations += facts.costs.document_mask_bytes_per_token(w, facts.run.data.seq_len)
    if dims.expert_parallel:  # on one rank every routed copy is its own: no imbalance
        activations += (facts.run.plan.expert_load - 1) * _routed_bytes(facts, dims, w)
    # fp8 / mxfp8: the converted linears cast their own weights (no autocast copy), and with
    # float8 all-gather FSDP gathers those in one byte (`trainer.plan.precision`)
    autocast_copied = p.matmul_per_rank(sizes) - (
        p.low_precision_per_rank(sizes) if lowp.low_precision(facts.run, dims) else 0.0)
    gathered = p.largest_unit_bytes(sizes, lowp.gather_width(facts.run, dims, w))
    return {
        "params": local * w.master,
        "grads": local * w.master,
        "optimizer": 2 * local * w.master,
        "autocast_weights": autocast_copied * w.compute if w.autocast_copies else 0.0,
        "fsdp_buffers": 2 * gathered + unit * w.reduce if dims.fsdp_size > 1 else 0.0,
        "ddp_buckets": local * w.reduce if dims.replicas_only else 0.0,
        "activations": dims.tokens_per_microbatch * activations,
        "logits": logits_bytes(facts, dims, w),
    }


def _routed_bytes(facts: RunFacts, dims: ParallelDims, w: Widths) -> float:
    routed = getattr(facts.costs, "routed_bytes_per_token", None)
    return routed(w, tp=dims.tp, checkpointing=dims.activation_checkpointing) if routed else 0.0


def logits_bytes(facts: RunFacts, dims: ParallelDims, w: Widths) -> float:
    """The loss's working set: the head's logits in the compute dtype, the fp32 copy
    cross_entropy works on (its log-softmax output, kept for backward) and that copy's gradient,
    and under 16-bit compute the logits' own 16-bit gradient beside it, vocab_size values each
    per token (measured: 12 bytes per token and vocabulary entry in fp32 and in bf16, by the
    memory tracker on the real step, `trainer.validate_plan`). Counted unsplit by tp: the head's
    output is gathered (Replicate) for a plain cross_entropy; a vocab-parallel loss would divide
    it by tp."""
    low_precision_grad = w.compute if w.compute < 4 else 0
    per_token = facts.costs.vocab_size * (w.compute + _FP32_LOSS_BYTES + low_precision_grad)
    return dims.tokens_per_microbatch * per_token


def step_time(facts: RunFacts, dims: ParallelDims, links: dict[str, Link]) -> dict[str, float]:
    """Seconds of one optimizer step, by kind; "step" is the total.

    compute: the family's training FLOPs per token for the step's tokens, split evenly over all
        ranks, at plan.mfu of the rank's peak; x 8/6 with activation checkpointing (one more
        forward pass). Under fp8 / mxfp8 the FLOPs of the matmuls the family converts run at
        that format's peak (`trainer.plan.precision`).
    casts: fp8 / mxfp8 only: casting the converted matmuls' operands, memory-bound
        (`trainer.plan.precision.cast_seconds`); FSDP traffic hides behind it as behind compute.
    tp: tensor-parallel traffic (the family's `tp_bytes_per_token`) over the link tp spans,
        exposed: each collective sits between two matmuls that need its result.
    fsdp: per micro-batch, FSDP2 all-gathers every parameter for forward and again for backward
        (it reshards after forward) and reduce-scatters the gradients, over the FSDP group's link.
    replicate: the replicas all-reduce the (sharded) gradients once per step over their link
        (gradient sync is skipped on accumulation micro-batches).
    exposed_dp: the FSDP and replica traffic overlaps plan.overlap of the compute time
        (prefetch, backward hooks); only what exceeds that adds to the step.
    With routed experts: the experts' FSDP traffic goes over the dp_shard ranks ep leaves and
        their link ("expert_fsdp"); ep: expert parallel's all-to-all (the family's
        `a2a_bytes_per_token`) over the link the ep group spans, exposed (each exchange sits
        between the router and the experts that need its result); and with ep > 1 the busiest
        rank receives plan.expert_load x its share of routed tokens, which scales the experts'
        FLOPs (`routed_flops_per_token`) and the all-to-all on it.
    Links run at plan.link_efficiency of their nominal bandwidth. Bandwidth only: latency per
    collective is not modelled.
    """
    run, hw = facts.run, facts.hardware
    w = widths(run, dims)
    accumulation = dims.accumulation
    load = run.plan.expert_load if dims.expert_parallel else 1.0
    passes = _RECOMPUTE_FACTOR if dims.activation_checkpointing else 1.0
    tokens_per_rank = dims.tokens_per_step / dims.world_size * passes
    per_token = facts.costs.flops_per_token(run.data.seq_len)
    per_token += (load - 1) * getattr(facts.costs, "routed_flops_per_token", lambda: 0.0)()
    flops = per_token * tokens_per_rank
    converted = lowp.converted_flops_per_token(facts.costs, run) * tokens_per_rank
    compute = ((flops - converted) / hw.peak_flops_per_rank()
               + converted / lowp.peak(hw, run)) / run.plan.mfu

    sizes, p = dims.split_sizes, facts.params
    casts = lowp.cast_seconds(facts.costs, run, dims, p.low_precision_per_rank(sizes), passes)
    width = lowp.gather_width(run, dims, w)

    def fsdp_traffic(groups: list[ParamGroup]) -> float:
        # all-gathered in the forward and again in the backward, gradients reduce-scattered
        return sum(g.local(sizes) * (2 * width(g) + w.reduce) for g in groups)

    dense = fsdp_traffic([g for g in p.groups if EP_DIM not in g.split])
    routed = fsdp_traffic([g for g in p.groups if EP_DIM in g.split])
    n_fsdp, n_rep = dims.fsdp_size, dims.dp_replicate
    fsdp_bytes = accumulation * ring_gather(dense, n_fsdp)
    expert_fsdp_bytes = accumulation * ring_gather(routed, n_fsdp // dims.ep)
    replicate_bytes = ring_allreduce(fsdp_local(p, dims) * w.reduce, n_rep)
    tp_bytes = accumulation * dims.tokens_per_microbatch * facts.costs.tp_bytes_per_token(
        w, tp=dims.tp, checkpointing=dims.activation_checkpointing)
    a2a = getattr(facts.costs, "a2a_bytes_per_token", None)
    ep_bytes = load * accumulation * dims.tokens_per_microbatch * (a2a(
        w, ep=dims.ep, checkpointing=dims.activation_checkpointing) if a2a else 0.0)

    def seconds(nbytes: float, link: Link) -> float:
        if not nbytes:
            return 0.0
        bandwidth = hw.link_bandwidth(link) * run.plan.link_efficiency
        return nbytes / bandwidth if bandwidth > 0 else math.inf  # no such link: never done

    tp = seconds(tp_bytes, links["tp"])
    ep = seconds(ep_bytes, links[EP_DIM])
    fsdp = seconds(fsdp_bytes, links["fsdp"]) + seconds(expert_fsdp_bytes, links["expert_fsdp"])
    replicate = seconds(replicate_bytes, links["dp_replicate"])
    exposed_dp = max(0.0, fsdp + replicate - run.plan.overlap * (compute + casts))
    return {"compute": compute, "casts": casts, "tp": tp, "ep": ep, "fsdp": fsdp,
            "replicate": replicate, "exposed_dp": exposed_dp,
            "step": compute + casts + tp + ep + exposed_dp}


# ---------------------------------------------------------------------------------------------
# Feasibility


def structural_rejection(facts: RunFacts, dims: ParallelDims,
                         links: dict[str, Link]) -> Rejection | None:
    """The first rule of the mesh's shape that `dims` breaks, before any estimate."""
    run, topo = facts.run, facts.topology
    if dims.world_size != topo.world:
        return Rejection(KEY.parallelism, dims.mesh_str,
                         f"{' x '.join(MESH_DIMS)} = {dims.world_size} must equal the world "
                         f"size {topo.world} (cluster.nodes x ranks per node)")
    for name, why in NOT_IMPLEMENTED.items():
        if dims.size(name) != 1:
            return Rejection(getattr(KEY.parallelism, name), dims.size(name), why)
    if run.uses_xla and (refused := xla_rejection(run, dims)):
        return refused
    mesh_refusal = getattr(facts.costs, "mesh_rejection", lambda uses_mesh: None)(dims.uses_mesh)
    if mesh_refusal:
        return Rejection(KEY.parallelism, dims.mesh_str, mesh_refusal)
    if (tp_refusal := facts.costs.tp_rejection(dims.tp)) is not None:
        return Rejection(*tp_refusal)
    if dims.tp > topo.ranks_per_node and topo.world > topo.ranks_per_node:
        return Rejection(KEY.parallelism.tp, dims.tp,
                         f"spans nodes: a {run.hardware.name} node has {topo.ranks_per_node} "
                         f"ranks, and tensor parallel stays inside one")
    if topo.ranks_per_node % dims.tp and topo.world > topo.ranks_per_node:
        return Rejection(KEY.parallelism.tp, dims.tp,
                         f"does not divide the {topo.ranks_per_node} ranks of a node, so some "
                         f"tp groups would straddle two nodes")
    return (_expert_rejection(facts, dims, links) or _batch_rejection(run, dims)
            or _link_rejection(facts, dims, links))


def _expert_rejection(facts: RunFacts, dims: ParallelDims,
                      links: dict[str, Link]) -> Rejection | None:
    """Expert parallel needs experts, a stack that runs its all-to-all, and a degree that splits
    the experts evenly; it stays inside the scale-up domain (NVL72 NVLink, UltraServer
    NeuronLink), the link its all-to-all is built for."""
    shardable = getattr(facts.costs, "expert_shard_rejection", None)
    if shardable is not None and dims.fsdp and (refusal := shardable(
            ep=dims.ep, tp=dims.tp, shards=dims.fsdp_size_of((EP_DIM,)))) is not None:
        return Rejection(*refusal)
    if dims.ep == 1:
        return None
    run, hw, key = facts.run, facts.hardware, KEY.parallelism.ep
    if not facts.has_experts:
        return Rejection(key, dims.ep, f"{KEY.model}={run.model.name} has no experts to split "
                                       f"(expert parallel needs {KEY.model.family}=moe)")
    if not hw.config.expert_parallel:
        return Rejection(key, dims.ep,
                         f"{hw.name}'s software stack has no expert-parallel backend "
                         f"(hardware.expert_parallel=false; AWS's neuron_ep runs on Trn3 only): "
                         f"plan it without EP, tensor parallel x FSDP, as AWS's own Trn2 MoE "
                         f"recipes do")
    if (refusal := facts.costs.ep_rejection(dims.ep)) is not None:
        return Rejection(*refusal)
    if links[EP_DIM] == "inter":
        return Rejection(key, dims.ep,
                         f"its groups of {dims.ep} (x tp={dims.tp}) ranks would cross "
                         f"{hw.name}'s scale-up domain ({facts.topology.ranks_per_domain} ranks): "
                         f"expert parallel's all-to-all stays on the domain's own links, "
                         f"never EFA", kind="link")
    return None


def _batch_rejection(run: RunConfig, dims: ParallelDims) -> Rejection | None:
    d = run.data
    per_step = d.micro_batch_size * dims.dp_size
    if d.global_batch_size is not None and d.global_batch_size % per_step:
        return Rejection(KEY.data.global_batch_size, d.global_batch_size,
                         f"must be a multiple of data.micro_batch_size x data-parallel size = "
                         f"{d.micro_batch_size} x {dims.dp_size} = {per_step}")
    return None


def _link_rejection(facts: RunFacts, dims: ParallelDims,
                    links: dict[str, Link]) -> Rejection | None:
    for name, size in dims.sizes.items():
        if size > 1 and facts.hardware.link_bandwidth(links[name]) <= 0:
            return Rejection(getattr(KEY.parallelism, name), size,
                             f"crosses the {links[name]} link, which {facts.hardware.name} "
                             f"does not have (its bandwidth is 0)", kind="link")
    return None


def memory_rejection(facts: RunFacts, dims: ParallelDims,
                     memory: dict[str, float]) -> Rejection | None:
    budget = facts.hardware.memory_bytes_per_rank
    usable = budget * facts.run.plan.memory_headroom
    need = sum(memory.values())
    if need <= usable:
        return None
    part, largest = max(memory.items(), key=lambda item: item[1])
    hint = (" (parallelism.param_dtype=bfloat16 has FSDP gather 16-bit weights instead)"
            if part == "autocast_weights" and dims.fsdp else "")
    ac = ", activation checkpointing" if dims.activation_checkpointing else ""
    return Rejection(KEY.parallelism, dims.mesh_str + ac,
                     f"needs {need / GIB:.1f} GiB per rank (largest: {part} "
                     f"{largest / GIB:.1f} GiB{hint}), {facts.hardware.name} has "
                     f"{budget / GIB:.1f} GiB ({usable / GIB:.1f} usable at "
                     f"{KEY.plan.memory_headroom}={facts.run.plan.memory_headroom})", kind="memory")


def evaluate(facts: RunFacts, shape: tuple[int, ...], activation_checkpointing: bool,
             ep: int = 1) -> Candidate:
    """One candidate with its estimate and, if it cannot run, the reason."""
    dims = facts.dims(shape, activation_checkpointing, ep)
    links = dim_links(facts.topology, dims.shape, dims.ep)
    times = step_time(facts, dims, links)
    if facts.run.uses_xla:
        times = xla_step_time(times)
    # a model of no known size (a user's module the meta device cannot build) has no step time
    tokens_per_s = dims.tokens_per_step / times["step"] if times["step"] else math.nan
    model_flops = facts.costs.flops_per_token(facts.run.data.seq_len) * tokens_per_s
    memory = memory_breakdown(facts, dims)
    rejection = (structural_rejection(facts, dims, links)
                 or memory_rejection(facts, dims, memory))
    return Candidate(dims, Estimate(
        memory, times, links, tokens_per_s,
        mfu=model_flops / (facts.hardware.peak_flops_per_rank() * dims.world_size),
        rejection=rejection), precision=facts.run.trainer.precision)


# ---------------------------------------------------------------------------------------------
# Planning


def factorizations(world: int) -> list[tuple[int, ...]]:
    """Every shape over `MESH_DIMS` whose product is `world`, not-implemented dims at 1."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    free = [name for name in MESH_DIMS if name not in NOT_IMPLEMENTED]
    shapes = []
    for sizes in product(divisors, repeat=len(free) - 1):
        rest, remainder = divmod(world, math.prod(sizes))
        if remainder:
            continue
        chosen = dict(zip(free[1:], sizes, strict=True)) | {free[0]: rest}
        shapes.append(tuple(chosen.get(name, 1) for name in MESH_DIMS))
    return sorted(shapes, key=lambda s: s[::-1])


def preference(candidate: Candidate) -> tuple[float, bool, float]:
    """Sort key, best first: highest throughput; among ties (all traffic hidden behind compute),
    dp_shard inside a domain, then the least memory."""
    e = candidate.estimate
    rounded = float(f"{e.tokens_per_s:.{_TIE_DIGITS}g}")
    return (-rounded, e.links.get("fsdp") == "inter", e.memory_bytes_per_rank)


def choose(run: RunConfig) -> Candidate:
    """The plan a run uses. With parallelism.name=auto: the best feasible candidate among those
    that keep every dim the user set (`constraints`); otherwise the explicit dims (one -1
    filled from the world size, unset dims 1), checked. Raises ConfigError naming the key to
    change when no such plan can run; a refused explicit plan names the auto plan, if any fits.
    With trainer.precision=auto, the fastest of those plans over the precisions the hardware
    trains with (`Candidate.precision` says which)."""
    if run.trainer.precision == PRECISION_AUTO:
        return _fastest_precision(run)
    facts = RunFacts.of(run)
    if run.parallelism.name == "auto":
        refusal = getattr(facts.costs, "auto_refusal", lambda: None)()
        if refusal is not None:
            raise refusal
        return _best(run, candidates(run, facts))
    ac = bool(run.parallelism.activation_checkpointing)
    shape, ep = explicit_shape(run), run.parallelism.ep or 1
    dp_shard = shape[MESH_DIMS.index(EP_SPLITS)]
    if dp_shard % ep:
        raise ConfigError(KEY.parallelism.ep, ep,
                          f"must divide {getattr(KEY.parallelism, EP_SPLITS)}={dp_shard}: expert "
                          f"parallel borrows its ranks from it")
    chosen = evaluate(facts, shape, ac, ep)
    if chosen.feasible:
        return chosen
    why = chosen.reason.why
    if chosen.reason.kind == "memory" and not ac:
        with_ac = evaluate(facts, chosen.dims.shape, True, ep)
        if with_ac.feasible:
            why += (f"; with {KEY.parallelism.activation_checkpointing}=true it needs "
                    f"{with_ac.estimate.memory_bytes_per_rank / GIB:.1f} GiB")
    unconstrained = [c for c in all_candidates(facts) if c.feasible]
    if unconstrained:
        best = min(unconstrained, key=preference)
        why += f"; {KEY.parallelism}=auto fits: {best.dims.describe()}"
    raise ConfigError(chosen.reason.key, chosen.reason.value, why)


def _fastest_precision(run: RunConfig) -> Candidate:
    """trainer.precision=auto: the plan of each precision `lowp.options` lists, the fastest
    (the earlier option on a tie); the first option's refusal when none can run."""
    found: list[tuple[int, Candidate]] = []
    refusal: ConfigError | None = None
    for order, precision in enumerate(lowp.options(run)):
        try:
            found.append((order, choose(lowp.with_precision(run, precision))))
        except ConfigError as exc:
            refusal = refusal or exc
    if not found:
        raise refusal  # type: ignore[misc]
    return min(found, key=lambda item: (preference(item[1])[0], item[0]))[1]


def resolve_precision(run: RunConfig) -> RunConfig:
    """`run` with trainer.precision=auto replaced by the planner's choice (unchanged otherwise):
    what the trainer, the validation and the comparison build from."""
    if run.trainer.precision != PRECISION_AUTO:
        return run
    return lowp.with_precision(run, choose(run).precision)


def constraints(run: RunConfig) -> dict[str, int]:
    """The dims a user fixed under parallelism=auto: set and not -1 (which means "the rest")."""
    p = run.parallelism
    return {name: size for name in (*MESH_DIMS, EP_DIM)
            if (size := getattr(p, name)) is not None and size != -1}


def candidates(run: RunConfig, facts: RunFacts | None = None) -> list[Candidate]:
    """The candidates auto chooses from: every factorization of the world size that keeps the
    fixed dims (`constraints`), with and without activation checkpointing unless that is fixed
    too, feasible or not, each with its estimate and rejection."""
    fixed = constraints(run)
    ac = run.parallelism.activation_checkpointing
    return [c for c in all_candidates(facts or RunFacts.of(run))
            if all(c.dims.split_sizes[name] == size for name, size in fixed.items())
            and (ac is None or c.dims.activation_checkpointing == ac)]


def all_candidates(facts: RunFacts) -> list[Candidate]:
    return [evaluate(facts, shape, ac, ep)
            for shape in factorizations(facts.topology.world)
            for ep in expert_degrees(facts, shape) for ac in (False, True)]


def expert_degrees(facts: RunFacts, shape: tuple[int, ...]) -> list[int]:
    """The ep degrees a shape offers: 1, and for a model with experts every divisor of dp_shard
    that splits them evenly."""
    if not facts.has_experts:
        return [1]
    dp_shard = shape[MESH_DIMS.index(EP_SPLITS)]
    return [ep for ep in range(1, dp_shard + 1)
            if dp_shard % ep == 0 and facts.costs.ep_rejection(ep) is None]


def _best(run: RunConfig, found: list[Candidate]) -> Candidate:
    feasible = [c for c in found if c.feasible]
    if feasible:
        return min(feasible, key=preference)
    fixed = constraints(run)
    if not found:
        name, size = next(iter(fixed.items()))
        others = ", ".join(f"{getattr(KEY.parallelism, n)}={v}" for n, v in fixed.items()
                           if n != name)
        raise ConfigError(getattr(KEY.parallelism, name), size,
                          f"no mesh of {run.world_size} ranks (cluster.nodes x ranks per node) "
                          f"has it{' with ' + others if others else ''}; the fixed dims must "
                          f"divide the world size")
    # the plan closest to running: right shape, least memory
    too_big = [c for c in found if c.reason and c.reason.kind == "memory"] or found
    leanest = min(too_big, key=lambda c: c.estimate.memory_bytes_per_rank)
    kept = f" that keep {', '.join(f'{getattr(KEY.parallelism, n)}={v}' for n, v in fixed.items())}"
    raise ConfigError(KEY.parallelism, "auto",
                      f"none of the {len(found)} candidates for {run.world_size} ranks"
                      f"{kept if fixed else ''} fits; the leanest is rejected: {leanest.reason}")


def explicit_shape(run: RunConfig) -> tuple[int, ...]:
    """The parallelism.* dims of an explicit plan: unset dims are 1, and one -1 is filled from
    the world size."""
    p = run.parallelism
    sizes = {name: 1 if getattr(p, name) is None else getattr(p, name) for name in MESH_DIMS}
    filled = [name for name, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size > 0)
    world = run.world_size
    if filled:
        if world % fixed:
            raise ConfigError(getattr(KEY.parallelism, filled[0]), -1,
                              f"the other dims multiply to {fixed}, which does not divide the "
                              f"world size {world} (cluster.nodes x trainer.devices)")
        sizes[filled[0]] = world // fixed
    return tuple(sizes[name] for name in MESH_DIMS)
