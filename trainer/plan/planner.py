"""`MeshPlan` and the planner: how a run's ranks split into named mesh dims, and whether it fits.

A plan factors the world size (cluster.nodes x ranks per node) into four dims, outermost first:

    dp_replicate x dp_shard x cp x tp

laid out row-major, so `tp` varies fastest. torchrun numbers ranks node-major (rank = node x
ranks_per_node + local_rank), and `init_device_mesh(device, plan.shape, mesh_dim_names=
plan.dim_names)` lays ranks out row-major, so a tp group is `tp` consecutive ranks: inside one
node whenever tp divides the ranks of a node. dp_shard (FSDP) comes next and stays inside an
UltraServer / NVLink domain while the domain is big enough; dp_replicate is outermost and is the
one dim that crosses domains.

Everything here is arithmetic on the config: no torch.distributed, no devices. For each candidate
the planner estimates the bytes one rank holds (`memory_breakdown`) and the time of one optimizer
step (`step_time`); the formulas and what they assume are in those functions' docstrings. Explicit
plans are checked and rejected with the reason; `parallelism=auto` picks the fastest feasible one.

    python -m trainer.plan [--all] [hydra overrides]   # table of candidates; see --help
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from trainer.config import KEY, ConfigError, RunConfig
from trainer.hardware import GIB, HardwareSpec, Link
from trainer.models.shape import ModelArgs, flops_per_token
from trainer.plan.mesh_plan import MESH_DIMS, MeshPlan, Rejection
from trainer.plan.xla import rejection as xla_rejection
from trainer.plan.xla import step_time as xla_step_time

# Dtype widths in bytes. Mixed precision computes in 16 bits; "32-true" computes in fp32, which
# the hardware spec counts against its bf16 peak.
_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}
_MIXED = ("bf16-mixed", "16-mixed")
_FP32_LOSS_BYTES = 4 + 4  # cross_entropy's fp32 log-softmax output, and its gradient
# Activation checkpointing recomputes each block's forward during backward: one more forward on
# top of forward + backward (2 + 4 FLOPs per weight and token), so 8/6 of the work.
_RECOMPUTE_FACTOR = 8 / 6
# Plans whose estimated throughput agrees to this many significant digits are a tie.
_TIE_DIGITS = 6


# ---------------------------------------------------------------------------------------------
# What the planner knows about a run, derived once


@dataclass(frozen=True)
class Params:
    """Parameter counts of the reference decoder (`trainer/models/llama.py`) by how they shard.

    Assumed tensor-parallel plan (torchtitan's for Llama): every matmul weight is split, wq/wk/wv/
    w1/w3 by output columns, wo/w2 by input rows, the output head by vocabulary (column-wise),
    and the embedding table by vocabulary too (Megatron's vocab-parallel embedding). RMSNorm
    weights are replicated over tp. FSDP shards everything.
    """

    block_matmul: int  # one block's projections
    block_norms: int  # one block's two RMSNorm weights
    n_layers: int
    embedding: int  # the token-embedding table; 0 when tied to the head
    head: int  # the output projection
    final_norm: int

    @classmethod
    def of(cls, args: ModelArgs) -> Params:
        kv_dim = args.n_kv_heads * args.head_dim
        vocab_x_dim = args.vocab_size * args.dim
        return cls(block_matmul=2 * args.dim * args.dim + 2 * args.dim * kv_dim
                   + 3 * args.dim * args.ffn_dim,
                   block_norms=2 * args.dim, n_layers=args.n_layers,
                   embedding=0 if args.tie_embeddings else vocab_x_dim,
                   head=vocab_x_dim, final_norm=args.dim)

    @property
    def total(self) -> int:
        return (self.n_layers * (self.block_matmul + self.block_norms) + self.embedding
                + self.head + self.final_norm)

    @property
    def tp_split(self) -> int:
        return self.n_layers * self.block_matmul + self.embedding + self.head

    @property
    def matmul(self) -> int:
        """Weights that go through a matmul (the embedding is a lookup)."""
        return self.n_layers * self.block_matmul + self.head

    def per_tp_rank(self, tp: int) -> float:
        return self.tp_split / tp + self.total - self.tp_split

    def largest_fsdp_unit(self, tp: int) -> float:
        """The most parameters one FSDP all-gather materializes on a tp rank, assuming FSDP2
        units as torchtitan wraps them: each block, the embedding, and final norm + head."""
        return max(self.block_matmul / tp + self.block_norms, self.embedding / tp,
                   self.head / tp + self.final_norm)


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

    @classmethod
    def of(cls, run: RunConfig, plan: MeshPlan) -> Widths:
        precision, p = run.trainer.precision, run.parallelism
        master = 2 if precision == "bf16-true" else 4
        fsdp_casts = plan.fsdp and p.param_dtype is not None
        precision_compute = 4 if precision == "32-true" else 2
        compute = _WIDTH[p.param_dtype] if fsdp_casts else precision_compute
        residual = compute if fsdp_casts or precision == "bf16-true" else 4
        gather = _WIDTH[p.param_dtype] if p.param_dtype else master
        reduce = _WIDTH[p.reduce_dtype] if p.reduce_dtype else gather
        return cls(master, compute, residual, gather, reduce,
                   autocast_copies=precision in _MIXED and not fsdp_casts)


@dataclass(frozen=True)
class RunFacts:
    """The parts of a run the estimates read, derived once per `candidates()` call."""

    run: RunConfig
    hardware: HardwareSpec
    args: ModelArgs
    params: Params
    topology: Topology

    @classmethod
    def of(cls, run: RunConfig) -> RunFacts:
        args = ModelArgs.from_config(run.model)
        hardware = HardwareSpec(run.hardware)
        topology = Topology(run.world_size, run.ranks_per_node,
                            run.ranks_per_node * run.hardware.nodes_per_domain)
        return cls(run, hardware, args, Params.of(args), topology)

    def bare_plan(self, dims: tuple[int, ...], activation_checkpointing: bool) -> MeshPlan:
        """A plan of `dims` carrying this run's batch, before any estimate."""
        d = self.run.data
        return MeshPlan(*dims, activation_checkpointing=activation_checkpointing,
                        micro_batch_size=d.micro_batch_size, seq_len=d.seq_len,
                        global_batch_size=d.global_batch_size,
                        links=dim_links(self.topology, tuple(dims)))


# ---------------------------------------------------------------------------------------------
# Estimates


def dim_links(topology: Topology, shape: tuple[int, ...]) -> dict[str, Link]:
    """The link each mesh dim (and the FSDP group, dp_shard x cp) crosses."""
    links: dict[str, Link] = {}
    stride = 1
    for name, size in reversed(list(zip(MESH_DIMS, shape, strict=True))):
        links[name] = topology.link(size, stride)
        stride *= size
    _, dp_shard, cp, tp = shape
    links["fsdp"] = topology.link(dp_shard * cp, tp)
    return {name: links[name] for name in (*MESH_DIMS, "fsdp")}


def memory_breakdown(facts: RunFacts, plan: MeshPlan) -> dict[str, float]:
    """Peak bytes one rank holds, by kind. Framework overhead (CUDA/Neuron runtime, allocator
    fragmentation, communication buffers) is what plan.memory_headroom leaves room for.

    params, grads, optimizer: the stored parameters, their gradients and AdamW's exp_avg and
        exp_avg_sq, all in the master dtype (`Widths`), 16 bytes per parameter in fp32
        (Rajbhandari et al. 2020, ZeRO, sec. 3.1). tp splits the matmul weights, not the norms;
        FSDP (dp_shard x cp) splits everything; dp_replicate holds full copies.
    autocast_weights: 16-bit copies of every local matmul weight that autocast keeps for the
        forward pass (see `Widths.autocast_copies`); FSDP does not shard them.
    fsdp_buffers: with FSDP, the unsharded parameters of the unit being computed and the next
        one (prefetched) in the gather dtype, and one unit's unsharded gradients before
        reduce-scatter in the reduce dtype.
    ddp_buckets: plain data parallel (replicas only, run by torch DDP) copies the gradients into
        its all-reduce buckets (gradient_as_bucket_view is off by default).
    activations, logits: see `activation_bytes` and `logits_bytes`.
    """
    w = Widths.of(facts.run, plan)
    p = facts.params
    local = p.per_tp_rank(plan.tp) / plan.fsdp_size
    unit = p.largest_fsdp_unit(plan.tp)
    return {
        "params": local * w.master,
        "grads": local * w.master,
        "optimizer": 2 * local * w.master,
        "autocast_weights": p.matmul / plan.tp * w.compute if w.autocast_copies else 0.0,
        "fsdp_buffers": unit * (2 * w.gather + w.reduce) if plan.fsdp_size > 1 else 0.0,
        "ddp_buckets": local * w.reduce if plan.replicas_only else 0.0,
        "activations": activation_bytes(facts, plan, w),
        "logits": logits_bytes(facts, plan, w),
    }


def activation_bytes(facts: RunFacts, plan: MeshPlan, w: Widths) -> float:
    """Bytes autograd keeps for backward across the blocks of one micro-batch.

    The method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", sec. 4.1): count the tensors each op saves, per token of the
    micro-batch, applied to this decoder (RMSNorm, GQA, SwiGLU, no dropout) with a fused
    attention kernel that keeps no seq_len x seq_len matrix. Per block and token (h = dim,
    f = ffn_dim, kv = n_kv_heads x head_dim; c, r = compute and residual widths):

      each of the two RMSNorms: its input as fp32 and its scaled output: (4 + r) h
      the normed input of the matmuls that follow: c h, once per norm; but autocast casts an
          fp32 input once per matmul, so then 3 (wq, wk, wv) + 2 (w1, w3) copies
      attention: q, k, v after rotary embedding and the kernel's output, which wo reads in place
          (the kernel writes it token-major, so transposing it back costs no copy): c (2h + 2 kv)
      SwiGLU: w1's and w3's outputs, silu's output and the product that w2 saves: c 4f

    Checked against the bytes autograd saves for `trainer.models.llama` on CPU (tests). Tensor
    parallel splits the attention and SwiGLU terms (each rank has its own heads and ffn columns);
    the rest is replicated, but sequence parallel splits the norms' terms (Korthikanti eq. 2 vs
    4) while the matmuls still save the gathered input. With activation checkpointing each block
    keeps only its input (r h), and one block's full set is alive while it is recomputed in
    backward. The final norm adds its own terms and the head's input.
    """
    args, tp = facts.args, plan.tp
    norm_split = tp if facts.run.parallelism.sequence_parallel and tp > 1 else 1
    kv_dim = args.n_kv_heads * args.head_dim
    norm = (4 + w.residual) * args.dim / norm_split
    matmul_inputs = (5 if w.residual != w.compute else 2) * w.compute * args.dim
    block = (2 * norm + matmul_inputs
             + w.compute * (2 * args.dim + 2 * kv_dim + 4 * args.ffn_dim) / tp)
    if plan.activation_checkpointing:
        blocks = args.n_layers * w.residual * args.dim / norm_split + block
    else:
        blocks = args.n_layers * block
    final_norm = norm + w.compute * args.dim
    return plan.tokens_per_microbatch * (blocks + final_norm)


def logits_bytes(facts: RunFacts, plan: MeshPlan, w: Widths) -> float:
    """The loss's working set: the head's logits in the compute dtype, the fp32 copy
    cross_entropy works on (its log-softmax output, kept for backward) and that copy's gradient,
    and under 16-bit compute the logits' own 16-bit gradient beside it, vocab_size values each
    per token (measured: 12 bytes per token and vocabulary entry in fp32 and in bf16, by the
    memory tracker on the real step, `trainer.validate_plan`). Counted unsplit by tp: the head's
    output is gathered (Replicate) for a plain cross_entropy; a vocab-parallel loss would divide
    it by tp."""
    low_precision_grad = w.compute if w.compute < 4 else 0
    per_token = facts.args.vocab_size * (w.compute + _FP32_LOSS_BYTES + low_precision_grad)
    return plan.tokens_per_microbatch * per_token


def _ring_allreduce(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `nbytes` over n ranks."""
    return 2 * (n - 1) / n * nbytes


def _ring_gather(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-gather (or reduce-scatter) of `nbytes` in total."""
    return (n - 1) / n * nbytes


def tp_bytes_per_microbatch(facts: RunFacts, plan: MeshPlan, w: Widths) -> float:
    """Bytes one rank sends for tensor parallel in one micro-batch (Megatron-LM's pattern,
    Shoeybi et al. 2019, sec. 3): each block all-reduces its [tokens, dim] output twice forward
    (attention, SwiGLU) and twice backward, twice more when checkpointing recomputes the forward
    (sequence parallel swaps each all-reduce for an all-gather plus a reduce-scatter, the same
    volume). The vocab-parallel embedding all-reduces its output; the head all-gathers its logits
    forward and all-reduces its input's gradient backward."""
    args, n = facts.args, plan.tp
    if n == 1:
        return 0.0
    tokens = plan.tokens_per_microbatch
    hidden = tokens * args.dim * w.compute
    per_block = 4 + (2 if plan.activation_checkpointing else 0)
    return (args.n_layers * per_block * _ring_allreduce(hidden, n)
            + _ring_allreduce(tokens * args.dim * w.residual, n)  # embedding output
            + _ring_gather(tokens * args.vocab_size * w.compute, n)  # logits
            + _ring_allreduce(hidden, n))  # head input's gradient


def step_time(facts: RunFacts, plan: MeshPlan) -> dict[str, float]:
    """Seconds of one optimizer step, by kind; "step" is the total.

    compute: training FLOPs per token (`trainer.models.llama.flops_per_token`: 6N + attention)
        for the step's tokens, split evenly over all ranks, at plan.mfu of the rank's peak;
        x 8/6 with activation checkpointing (one more forward pass).
    tp: tensor-parallel traffic (`tp_bytes_per_microbatch`) over the link tp spans, exposed:
        each collective sits between two matmuls that need its result.
    fsdp: per micro-batch, FSDP2 all-gathers every parameter for forward and again for backward
        (it reshards after forward) and reduce-scatters the gradients, over the FSDP group's link.
    replicate: the replicas all-reduce the (sharded) gradients once per step over their link
        (gradient sync is skipped on accumulation micro-batches).
    exposed_dp: the FSDP and replica traffic overlaps plan.overlap of the compute time
        (prefetch, backward hooks); only what exceeds that adds to the step.
    Links run at plan.link_efficiency of their nominal bandwidth. Bandwidth only: latency per
    collective is not modelled.
    """
    run, hw, args = facts.run, facts.hardware, facts.args
    w = Widths.of(run, plan)
    links = plan.links or dim_links(facts.topology, plan.shape)
    accumulation = plan.accumulation
    tokens = plan.tokens_per_step
    flops = flops_per_token(args, run.data.seq_len) * tokens / plan.world_size
    if plan.activation_checkpointing:
        flops *= _RECOMPUTE_FACTOR
    compute = flops / (hw.peak_flops_per_rank() * run.plan.mfu)

    local_params = facts.params.per_tp_rank(plan.tp)
    n_fsdp, n_rep = plan.fsdp_size, plan.dp_replicate
    fsdp_bytes = accumulation * _ring_gather(local_params * (2 * w.gather + w.reduce), n_fsdp)
    replicate_bytes = _ring_allreduce(local_params / n_fsdp * w.reduce, n_rep)
    tp_bytes = accumulation * tp_bytes_per_microbatch(facts, plan, w)

    def seconds(nbytes: float, link: Link) -> float:
        if not nbytes:
            return 0.0
        bandwidth = hw.link_bandwidth(link) * run.plan.link_efficiency
        return nbytes / bandwidth if bandwidth > 0 else math.inf  # no such link: never done

    tp = seconds(tp_bytes, links["tp"])
    fsdp = seconds(fsdp_bytes, links["fsdp"])
    replicate = seconds(replicate_bytes, links["dp_replicate"])
    exposed_dp = max(0.0, fsdp + replicate - run.plan.overlap * compute)
    return {"compute": compute, "tp": tp, "fsdp": fsdp, "replicate": replicate,
            "exposed_dp": exposed_dp, "step": compute + tp + exposed_dp}


# ---------------------------------------------------------------------------------------------
# Feasibility


def structural_rejection(facts: RunFacts, plan: MeshPlan) -> Rejection | None:
    """The first rule of the mesh's shape that `plan` breaks, before any estimate."""
    run, args, topo = facts.run, facts.args, facts.topology
    if plan.world_size != topo.world:
        return Rejection(KEY.parallelism, plan.mesh_str,
                         f"dp_replicate x dp_shard x cp x tp = {plan.world_size} must equal the "
                         f"world size {topo.world} (cluster.nodes x ranks per node)")
    if plan.cp != 1:
        return Rejection(KEY.parallelism.cp, plan.cp,
                         "context parallel is not implemented yet; use 1")
    if run.uses_xla and (refused := xla_rejection(run, plan)):
        return refused
    for key in ("n_heads", "n_kv_heads"):
        heads = getattr(args, key)
        if heads % plan.tp:
            return Rejection(KEY.parallelism.tp, plan.tp,
                             f"does not divide {getattr(KEY.model, key)}={heads}")
    if plan.tp > topo.ranks_per_node and topo.world > topo.ranks_per_node:
        return Rejection(KEY.parallelism.tp, plan.tp,
                         f"spans nodes: a {run.hardware.name} node has {topo.ranks_per_node} "
                         f"ranks, and tensor parallel stays inside one")
    if topo.ranks_per_node % plan.tp and topo.world > topo.ranks_per_node:
        return Rejection(KEY.parallelism.tp, plan.tp,
                         f"does not divide the {topo.ranks_per_node} ranks of a node, so some "
                         f"tp groups would straddle two nodes")
    return _batch_rejection(run, plan) or _link_rejection(facts, plan)


def _batch_rejection(run: RunConfig, plan: MeshPlan) -> Rejection | None:
    d = run.data
    per_step = d.micro_batch_size * plan.dp_size
    if d.global_batch_size is not None and d.global_batch_size % per_step:
        return Rejection(KEY.data.global_batch_size, d.global_batch_size,
                         f"must be a multiple of data.micro_batch_size x data-parallel size = "
                         f"{d.micro_batch_size} x {plan.dp_size} = {per_step}")
    return None


def _link_rejection(facts: RunFacts, plan: MeshPlan) -> Rejection | None:
    links = plan.links or dim_links(facts.topology, plan.shape)
    for name, size in zip(MESH_DIMS, plan.shape, strict=True):
        if size > 1 and facts.hardware.link_bandwidth(links[name]) <= 0:
            return Rejection(getattr(KEY.parallelism, name), size,
                             f"crosses the {links[name]} link, which {facts.hardware.name} "
                             f"does not have (its bandwidth is 0)", kind="link")
    return None


def memory_rejection(facts: RunFacts, plan: MeshPlan) -> Rejection | None:
    budget = facts.hardware.memory_bytes_per_rank
    usable = budget * facts.run.plan.memory_headroom
    need = plan.memory_bytes_per_rank
    if need <= usable:
        return None
    part, largest = max(plan.memory_breakdown.items(), key=lambda item: item[1])
    hint = (" (parallelism.param_dtype=bfloat16 has FSDP gather 16-bit weights instead)"
            if part == "autocast_weights" and plan.fsdp else "")
    ac = ", activation checkpointing" if plan.activation_checkpointing else ""
    return Rejection(KEY.parallelism, plan.mesh_str + ac,
                     f"needs {need / GIB:.1f} GiB per rank (largest: {part} "
                     f"{largest / GIB:.1f} GiB{hint}), {facts.hardware.name} has "
                     f"{budget / GIB:.1f} GiB ({usable / GIB:.1f} usable at "
                     f"{KEY.plan.memory_headroom}={facts.run.plan.memory_headroom})", kind="memory")


def evaluate(facts: RunFacts, dims: tuple[int, int, int, int],
             activation_checkpointing: bool) -> MeshPlan:
    """One candidate with its estimates and, if it cannot run, the reason."""
    bare = facts.bare_plan(dims, activation_checkpointing)
    times = step_time(facts, bare)
    if facts.run.uses_xla:
        times = xla_step_time(times)
    tokens_per_s = bare.tokens_per_step / times["step"]
    model_flops = flops_per_token(facts.args, facts.run.data.seq_len) * tokens_per_s
    estimated = replace(bare, memory_breakdown=memory_breakdown(facts, bare),
                        time_breakdown=times, step_seconds=times["step"],
                        tokens_per_s=tokens_per_s,
                        mfu=model_flops / (facts.hardware.peak_flops_per_rank() * bare.world_size))
    return replace(estimated, reason=structural_rejection(facts, estimated)
                   or memory_rejection(facts, estimated))


# ---------------------------------------------------------------------------------------------
# Planning


def factorizations(world: int) -> list[tuple[int, int, int, int]]:
    """Every (dp_replicate, dp_shard, cp=1, tp) whose product is `world`."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    return [(world // (shard * tp), shard, 1, tp)
            for tp in divisors for shard in divisors if (world // tp) % shard == 0]


def preference(plan: MeshPlan) -> tuple[float, bool, float]:
    """Sort key, best first: highest throughput; among ties (all traffic hidden behind compute),
    dp_shard inside a domain, then the least memory."""
    rounded = float(f"{plan.tokens_per_s:.{_TIE_DIGITS}g}")
    return (-rounded, plan.links.get("fsdp") == "inter", plan.memory_bytes_per_rank)


def plan(run: RunConfig) -> MeshPlan:
    """The plan a run uses. With parallelism.name=auto: the best feasible candidate among those
    that keep every dim the user set (`constraints`); otherwise the explicit dims (one -1
    filled from the world size, unset dims 1), checked. Raises ConfigError naming the key to
    change when no such plan can run; a refused explicit plan names the auto plan, if any fits."""
    if run.parallelism.name == "auto":
        return _best(run, candidates(run))
    facts = RunFacts.of(run)
    ac = bool(run.parallelism.activation_checkpointing)
    chosen = evaluate(facts, explicit_dims(run), ac)
    if chosen.reason is None:
        return chosen
    why = chosen.reason.why
    if chosen.reason.kind == "memory" and not ac:
        with_ac = evaluate(facts, chosen.shape, True)  # type: ignore[arg-type]
        if with_ac.feasible:
            why += (f"; with {KEY.parallelism.activation_checkpointing}=true it needs "
                    f"{with_ac.memory_bytes_per_rank / GIB:.1f} GiB")
    unconstrained = [p for p in all_candidates(facts) if p.feasible]
    if unconstrained:
        best = min(unconstrained, key=preference)
        why += f"; {KEY.parallelism}=auto fits: {best.describe()}"
    raise ConfigError(chosen.reason.key, chosen.reason.value, why)


def constraints(run: RunConfig) -> dict[str, int]:
    """The dims a user fixed under parallelism=auto: set and not -1 (which means "the rest")."""
    p = run.parallelism
    return {name: size for name in MESH_DIMS
            if (size := getattr(p, name)) is not None and size != -1}


def candidates(run: RunConfig) -> list[MeshPlan]:
    """The candidates auto chooses from: every factorization of the world size that keeps the
    fixed dims (`constraints`), with and without activation checkpointing unless that is fixed
    too, feasible or not, each with its estimates and rejection."""
    fixed = constraints(run)
    ac = run.parallelism.activation_checkpointing
    return [p for p in all_candidates(RunFacts.of(run))
            if all(getattr(p, name) == size for name, size in fixed.items())
            and (ac is None or p.activation_checkpointing == ac)]


def all_candidates(facts: RunFacts) -> list[MeshPlan]:
    return [evaluate(facts, dims, ac)
            for dims in factorizations(facts.topology.world) for ac in (False, True)]


def _best(run: RunConfig, plans: list[MeshPlan]) -> MeshPlan:
    feasible = [p for p in plans if p.feasible]
    if feasible:
        return min(feasible, key=preference)
    fixed = constraints(run)
    if not plans:
        name, size = next(iter(fixed.items()))
        others = ", ".join(f"{getattr(KEY.parallelism, n)}={v}" for n, v in fixed.items()
                           if n != name)
        raise ConfigError(getattr(KEY.parallelism, name), size,
                          f"no mesh of {run.world_size} ranks (cluster.nodes x ranks per node) "
                          f"has it{' with ' + others if others else ''}; the fixed dims must "
                          f"divide the world size")
    # the plan closest to running: right shape, least memory
    too_big = [p for p in plans if p.reason and p.reason.kind == "memory"] or plans
    leanest = min(too_big, key=lambda p: p.memory_bytes_per_rank)
    kept = f" that keep {', '.join(f'{getattr(KEY.parallelism, n)}={v}' for n, v in fixed.items())}"
    raise ConfigError(KEY.parallelism, "auto",
                      f"none of the {len(plans)} candidates for {run.world_size} ranks"
                      f"{kept if fixed else ''} fits; the leanest is rejected: {leanest.reason}")


def explicit_dims(run: RunConfig) -> tuple[int, int, int, int]:
    """parallelism.{dp_replicate, dp_shard, cp, tp} of an explicit plan: unset dims are 1, and
    one -1 is filled from the world size."""
    p = run.parallelism
    dims = {name: 1 if getattr(p, name) is None else getattr(p, name) for name in MESH_DIMS}
    filled = [name for name, size in dims.items() if size == -1]
    fixed = math.prod(size for size in dims.values() if size > 0)
    world = run.world_size
    if filled:
        if world % fixed:
            raise ConfigError(getattr(KEY.parallelism, filled[0]), -1,
                              f"the other dims multiply to {fixed}, which does not divide the "
                              f"world size {world} (cluster.nodes x trainer.devices)")
        dims[filled[0]] = world // fixed
    return tuple(dims[name] for name in MESH_DIMS)  # type: ignore[return-value]
