"""The MoE decoder's shape and everything the planner derives from it: total and active
parameters by how they shard, FLOPs per token from the active ones, activation bytes,
tensor-parallel and all-to-all traffic.

No torch here: the planner and the command lines that only plan import this without paying
torch's import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import KEY, ConfigError
from trainer.models.family import ParamCounts, ParamGroup, Widths, ring_allreduce, ring_gather


@dataclass(frozen=True)
class MoEArgs:
    """A Qwen3-MoE-shaped decoder (grouped-query attention with per-head q/k RMSNorm, routed
    SwiGLU experts, optional shared experts, optional dense layers); field names are `model.*`
    keys of `trainer.config.ModelConfig`."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int | None = None  # None: dim // n_heads
    vocab_size: int = 256
    ffn_dim: int = 768  # the dense layers' SwiGLU
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_experts: int = 8
    top_k: int = 2
    moe_ffn_dim: int = 256
    n_shared_experts: int = 0
    moe_every: int = 1
    n_dense_layers: int = 0
    norm_topk_prob: bool = True
    aux_loss_coef: float = 0.001
    bias_update_rate: float = 0.0

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def is_moe_layer(self, layer: int) -> bool:
        """Hugging Face's Qwen3-MoE rule: layer i (from 0) routes unless it is one of the first
        n_dense_layers (its `mlp_only_layers`) or (i + 1) is not a multiple of moe_every (its
        `decoder_sparse_step`)."""
        return layer >= self.n_dense_layers and (layer + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def shared_ffn_dim(self) -> int:
        return self.n_shared_experts * self.moe_ffn_dim

    def check(self) -> None:
        """Raise ConfigError for the first shape rule this breaks."""
        m = KEY.model
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim",
                    "max_seq_len", "n_experts", "top_k", "moe_ffn_dim", "moe_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(getattr(m, key), getattr(self, key), "must be positive")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(m.dim, self.dim, f"must be divisible by {m.n_heads}={self.n_heads} "
                              f"(or set {m.head_dim})")
        if self.head_size <= 0 or self.head_size % 2:
            raise ConfigError(m.head_dim, self.head_size,
                              "must be positive and even (rotary embeddings rotate pairs)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(m.n_kv_heads, self.n_kv_heads,
                              f"must divide {m.n_heads}={self.n_heads}")
        if self.top_k > self.n_experts:
            raise ConfigError(m.top_k, self.top_k,
                              f"must be at most {m.n_experts}={self.n_experts}")
        for key in ("n_shared_experts", "n_dense_layers", "aux_loss_coef", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigError(getattr(m, key), getattr(self, key), "must be 0 or more")
        if self.n_moe_layers == 0:
            raise ConfigError(m.n_dense_layers, self.n_dense_layers,
                              f"leaves no MoE layer among {m.n_layers}={self.n_layers} with "
                              f"{m.moe_every}={self.moe_every}")

    # --- parameters and FLOPs --------------------------------------------------------------

    def param_counts(self) -> ParamCounts:
        """Parameters by how they shard (`trainer/models/moe/parallelize.py`): attention and the
        dense and shared SwiGLUs as Llama's under tensor parallel; the router and the per-head
        q/k norms whole; the experts split over ep (whole experts) and tp (their hidden size).
        FSDP units: a dense block, an MoE block without its experts, the experts of one layer
        (sharded over the dp_shard ranks ep leaves), the embedding, the final norm with the
        head."""
        d, e = self.dim, self.n_experts
        attention = 2 * d * self.q_dim + 2 * d * self.kv_dim
        norms = 2 * d + 2 * self.head_size
        n_moe = self.n_moe_layers
        n_dense = self.n_layers - n_moe
        groups = [
            ParamGroup("moe_block", attention + 3 * d * self.shared_ffn_dim, n_moe,
                       split=("tp",), matmul=True),
            ParamGroup("moe_block", d * e, n_moe, matmul=True),  # router
            ParamGroup("moe_block", norms, n_moe),
            ParamGroup("experts", 3 * d * self.moe_ffn_dim * e, n_moe, split=("ep", "tp"),
                       matmul=True),
            ParamGroup("head", self.vocab_size * d, split=("tp",), matmul=True),
            ParamGroup("head", d),
            ParamGroup("embedding", self.vocab_size * d, split=("tp",)),
        ]
        if n_dense:
            groups += [ParamGroup("dense_block", attention + 3 * d * self.ffn_dim, n_dense,
                                  split=("tp",), matmul=True),
                       ParamGroup("dense_block", norms, n_dense)]
        return ParamCounts(tuple(groups))

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Every parameter (all experts): what memory holds."""
        counts = self.param_counts()
        table = sum(g.per_unit for g in counts.groups if g.unit == "embedding")
        return counts.total - (0 if include_embedding else table)

    def active_params(self, *, include_embedding: bool = True) -> int:
        """The parameters one token passes through: top_k of n_experts experts per MoE layer."""
        experts = 3 * self.dim * self.moe_ffn_dim * self.n_experts * self.n_moe_layers
        idle = experts * (self.n_experts - self.top_k) // self.n_experts
        return self.num_params(include_embedding=include_embedding) - idle

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token from the active parameters: 6 N_active + 12 x n_layers x
        (n_heads x head_dim) x seq_len, Llama's PaLM-convention count with the experts a token
        does not visit left out, as MoE papers report MFU (DeepSeek-V3 counts activated
        parameters). The router's matmul is in N_active; its softmax and the dispatch are not."""
        dense = 6 * self.active_params(include_embedding=False)
        attention = 12 * self.n_layers * self.q_dim * seq_len
        return float(dense + attention)

    def routed_flops_per_token(self) -> float:
        """The part of `flops_per_token` the experts do, which lands on whichever expert-parallel
        rank holds the expert: the planner scales it by the load of the busiest one."""
        return 6.0 * self.n_moe_layers * self.top_k * 3 * self.dim * self.moe_ffn_dim

    # --- memory and traffic ------------------------------------------------------------------

    def tp_rejection(self, tp: int) -> tuple[str, int, str] | None:
        """Heads split evenly (as Llama's); so must each expert's hidden size, which tensor
        parallel splits on the local experts."""
        for key in ("n_heads", "n_kv_heads", "moe_ffn_dim"):
            if getattr(self, key) % tp:
                return (KEY.parallelism.tp, tp,
                        f"does not divide {getattr(KEY.model, key)}={getattr(self, key)}")
        return None

    def ep_rejection(self, ep: int) -> tuple[str, int, str] | None:
        """Every expert-parallel rank holds the same number of whole experts."""
        if self.n_experts % ep:
            return (KEY.parallelism.ep, ep,
                    f"does not divide {KEY.model.n_experts}={self.n_experts}")
        return None

    def expert_shard_rejection(self, *, ep: int, tp: int,
                               shards: int) -> tuple[str, int, str] | None:
        """FSDP2 splits a rank's expert stack ([n_experts / ep, moe_ffn_dim / tp, dim] or its
        transpose) over `shards` ranks on one dim, and pads only dim 0: some dim must divide
        evenly unless dim 0 does (padding whole experts would multiply their memory)."""
        local = (self.n_experts // ep, self.moe_ffn_dim // tp, self.dim)
        if shards == 1 or any(size % shards == 0 for size in local):
            return None
        return (KEY.parallelism.ep, ep,
                f"leaves each rank's experts [{', '.join(map(str, local))}] to FSDP over "
                f"{shards} ranks, which divide none of those dims (FSDP2 pads only dim 0, here to "
                f"{math.ceil(local[0] / shards) * shards / local[0]:.1f}x its experts); choose "
                f"ep, dp_shard and dp_replicate so that dp_shard / ep divides one of them")

    def activation_bytes_per_token(self, w: Widths, *, tp: int, sequence_parallel: bool,
                                   checkpointing: bool) -> float:
        """Bytes autograd keeps for backward per token of a micro-batch, with every expert
        receiving its mean share of tokens (`routed_bytes_per_token` is the part that grows with
        imbalance). Counted the way Llama's estimate is (Korthikanti et al. 2022, sec. 4.1: the
        tensors each op saves), for this block (h = dim, q = n_heads x head_dim, kv, f the dense
        or shared SwiGLU's hidden size, E experts, k = top_k; c, r = compute and residual
        widths; "autocast" when they differ, which casts each matmul's input on its own):

          each of the two RMSNorms: (4 + r) h; the normed input of wq/wk/wv: c h, once per
              matmul under autocast
          q and k: the per-head RMSNorm keeps its fp32 input and scaled output, (4 + c), and
              SDPA keeps them after rotary (whose fp32 arithmetic saves only the tables), with v
              and its output: (4 + c)(q + kv) + c (2q + 2kv)
          a dense layer: SwiGLU's 4 c f and its input, cast twice under autocast
          the router: its input c h, fp32 probabilities 4 E, the chosen indices and routing
              weights 12 k (int64 and fp32) and their sum 4
          each routed copy (k per token): the gathered input and the output the routing weight
              multiplies, 2 c h; the SwiGLU's four tensors, 4 c I; two int64 permutation indices
              and the weight in c: 16 + c (`routed_bytes_per_token`)
          shared experts: a dense SwiGLU of n_shared_experts x I reading the router's input
              (cast twice more under autocast)

        Checked against the bytes autograd saves for the model on CPU (tests). Tensor parallel
        divides what lives on each rank's heads and hidden columns. With activation checkpointing
        each block keeps its input (r h) and one block's full set is alive while it is
        recomputed. Sequence parallel is not offered for this family."""
        h, c, r = self.dim, w.compute, w.residual
        autocast = r != c
        q, kv = self.q_dim, self.kv_dim
        attention = (2 * (4 + r) * h + (3 if autocast else 1) * c * h
                     + ((4 + c) * (q + kv) + c * (2 * q + 2 * kv)) / tp)
        dense = attention + (2 if autocast else 1) * c * h + 4 * c * self.ffn_dim / tp
        router = c * h + 4 * self.n_experts + 12 * self.top_k + 4
        shared = ((2 * c * h if autocast else 0) + 4 * c * self.shared_ffn_dim / tp
                  if self.n_shared_experts else 0)
        moe = attention + router + shared + self._routed_per_layer(w, tp)
        n_moe = self.n_moe_layers
        if checkpointing:
            blocks = self.n_layers * r * h + max(moe, dense if n_moe < self.n_layers else 0)
        else:
            blocks = n_moe * moe + (self.n_layers - n_moe) * dense
        final_norm = (4 + r) * h + c * h
        return blocks + final_norm

    def document_mask_bytes_per_token(self, w: Widths, seq_len: int) -> float:
        """As Llama's (`LlamaArgs.document_mask_bytes_per_token`): the one block-causal mask
        every layer's attention keeps, seq_len x compute bytes per token, and the rotary tables
        gathered at each token's position in its document, head_size x master bytes."""
        return seq_len * w.compute + self.head_size * w.master

    def _routed_per_layer(self, w: Widths, tp: int) -> float:
        c = w.compute
        return self.top_k * (2 * c * self.dim + 4 * c * self.moe_ffn_dim / tp + 16 + c)

    def routed_bytes_per_token(self, w: Widths, *, tp: int, checkpointing: bool) -> float:
        """The part of `activation_bytes_per_token` that the busiest expert-parallel rank holds
        more of when routing is imbalanced: the routed copies of every MoE layer (one layer's
        with activation checkpointing)."""
        return self._routed_per_layer(w, tp) * (1 if checkpointing else self.n_moe_layers)

    def tp_bytes_per_token(self, w: Widths, *, tp: int, checkpointing: bool) -> float:
        """Bytes one rank sends for tensor parallel per token: as Llama's (each block all-reduces
        its [tokens, dim] output twice forward and twice backward, twice more when checkpointing
        recomputes it); an MoE layer's experts reduce their partial sums as the dense SwiGLU
        does, and a shared expert adds one more all-reduce each way."""
        if tp == 1:
            return 0.0
        hidden = self.dim * w.compute
        per_block = 4 + (2 if checkpointing else 0)
        shared = self.n_moe_layers * (2 + (1 if checkpointing else 0)) * (
            1 if self.n_shared_experts else 0)
        return ((self.n_layers * per_block + shared) * ring_allreduce(hidden, tp)
                + ring_allreduce(self.dim * w.residual, tp)  # embedding output
                + ring_gather(self.vocab_size * w.compute, tp)  # logits
                + ring_allreduce(hidden, tp))  # head input's gradient

    def a2a_bytes_per_token(self, w: Widths, *, ep: int, checkpointing: bool) -> float:
        """Bytes one rank sends for expert parallel per token of its micro-batch, every expert
        getting its mean share: each MoE layer dispatches top_k copies of the token's [dim]
        input and combines as many outputs, (ep - 1) / ep of them to other ranks; backward
        exchanges the gradients the same way, and checkpointing recomputes the forward's two."""
        if ep == 1:
            return 0.0
        exchanges = 4 + (2 if checkpointing else 0)
        return (self.n_moe_layers * exchanges * self.top_k * self.dim * w.compute
                * (ep - 1) / ep)
