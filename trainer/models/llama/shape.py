"""The Llama decoder's shape and everything the planner derives from it: parameters by how they
shard, FLOPs per token, activation bytes, tensor-parallel traffic.

No torch here: the planner, the hardware comparison and the command lines that only plan import
this without paying torch's import time.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import KEY, ConfigError
from trainer.models.family import ParamCounts, ParamGroup, Widths, ring_allreduce, ring_gather

# fp8 / mxfp8 matmuls need both dims of a weight in multiples of 16 (torch._scaled_mm, as
# torchao's float8 filter checks) and MXFP8 scales blocks of 32 along them (OCP MX spec 1.0;
# NVIDIA Transformer Engine's MXFP8 page): 32 serves both.
LOW_PRECISION_ALIGNMENT = 32


@dataclass(frozen=True)
class LlamaArgs:
    """The decoder's shape; field names are `model.*` keys of `trainer.config.ModelConfig`."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 256
    ffn_dim: int = 768
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def check(self) -> None:
        """Raise ConfigError for the first shape rule this breaks."""
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim",
                    "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(getattr(KEY.model, key), getattr(self, key), "must be positive")
        if self.dim % self.n_heads:
            raise ConfigError(KEY.model.dim, self.dim,
                              f"must be divisible by {KEY.model.n_heads}={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(KEY.model.dim, self.dim,
                              "dim / n_heads must be even (rotary embeddings rotate pairs)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(KEY.model.n_kv_heads, self.n_kv_heads,
                              f"must divide {KEY.model.n_heads}={self.n_heads}")

    # --- what trains in fp8 / mxfp8 ------------------------------------------------------------

    def block_linears(self) -> dict[str, tuple[int, int, str]]:
        """Each block's projections: name -> (in features, out features, how tensor parallel
        splits it: "col" by output, "row" by input)."""
        d, kv, f = self.dim, self.kv_dim, self.ffn_dim
        return {"attention.wq": (d, d, "col"), "attention.wk": (d, kv, "col"),
                "attention.wv": (d, kv, "col"), "attention.wo": (d, d, "row"),
                "feed_forward.w1": (d, f, "col"), "feed_forward.w3": (d, f, "col"),
                "feed_forward.w2": (f, d, "row")}

    def low_precision_linears(self) -> tuple[str, ...]:
        """The block projections that train in fp8 / mxfp8 (names inside a block): those whose
        dims are multiples of LOW_PRECISION_ALIGNMENT. The output head stays bf16, as in
        torchtitan's float8 recipes (docs/float8.md: filter_fqns = ["output"]): its logits feed
        the loss directly; the embedding is a lookup and the norms are not matmuls."""
        return tuple(name for name, (n_in, n_out, _) in self.block_linears().items()
                     if n_in % LOW_PRECISION_ALIGNMENT == 0
                     and n_out % LOW_PRECISION_ALIGNMENT == 0)

    def low_precision_flops_per_token(self) -> float:
        """6 x the converted weights per token (the PaLM count of `flops_per_token`)."""
        return 6.0 * self.n_layers * self._converted_weights()

    def low_precision_cast_elements_per_token(self, tp: int) -> float:
        """Per token and rank: each converted projection casts its input and its output's
        gradient; tensor parallel splits a column-parallel one's output and a row-parallel
        one's input."""
        linears = self.block_linears()
        per_block = 0.0
        for name in self.low_precision_linears():
            n_in, n_out, style = linears[name]
            per_block += n_in / tp + n_out if style == "row" else n_in + n_out / tp
        return self.n_layers * per_block

    def _converted_weights(self) -> int:
        linears = self.block_linears()
        return sum(linears[n][0] * linears[n][1] for n in self.low_precision_linears())

    # --- parameters and FLOPs --------------------------------------------------------------

    def param_counts(self) -> ParamCounts:
        """Parameters by how they shard, under torchtitan's tensor-parallel plan for Llama: every
        matmul weight split by tp (wq/wk/wv/w1/w3 by output columns, wo/w2 by input rows, the head
        by vocabulary), the embedding table by vocabulary too (Megatron's vocab-parallel
        embedding), the RMSNorm weights whole. FSDP units as `parallelize` wraps them: each block,
        the embedding, the final norm with the head. A tied table is counted once, as the head.
        The block projections that train in fp8 / mxfp8 are a group of their own."""
        d, vocab_x_dim = self.dim, self.vocab_size * self.dim
        block_matmul = 2 * d * d + 2 * d * self.kv_dim + 3 * d * self.ffn_dim
        converted = self._converted_weights()
        groups = [
            ParamGroup("block", converted, self.n_layers, split=("tp",), matmul=True,
                       low_precision=True),
            ParamGroup("block", block_matmul - converted, self.n_layers, split=("tp",),
                       matmul=True),
            ParamGroup("block", 2 * d, self.n_layers),
            ParamGroup("head", vocab_x_dim, split=("tp",), matmul=True),
            ParamGroup("head", d),
        ]
        if not self.tie_embeddings:
            groups.append(ParamGroup("embedding", vocab_x_dim, split=("tp",)))
        return ParamCounts(tuple(g for g in groups if g.per_unit))

    def num_params(self, *, include_embedding: bool = True) -> int:
        """include_embedding=False leaves out the token-embedding table, a lookup that does no
        arithmetic; the output projection stays (a matmul over every token)."""
        counts = self.param_counts()
        return counts.total if include_embedding else counts.total - sum(
            g.per_unit for g in counts.groups if g.unit == "embedding")

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token: 6N + 12 * n_layers * dim * seq_len.

        The PaLM convention (Chowdhery et al. 2022, appendix B), which torchtitan also uses for
        MFU: each weight does one multiply-add per token forward and two backward (6N, N the
        non-embedding parameters); attention's scores and weighted sum add 2 x 2 x seq_len x dim
        per layer forward (as in Chinchilla, Hoffmann et al. 2022, appendix F), times 3 for
        forward + backward. The full seq_len x seq_len score matrix is counted although the causal
        mask makes half of it unnecessary, as PaLM does: MFU from this figure compares with
        published ones, not with a hardware count. With document masking the attention kernel
        takes a dense mask and computes every one of those pairs (the causal kernels skip about
        half): for it this is the hardware count too. (Measured on an H200, torch 2.11, 32 heads,
        seq_len 8192: the masked kernel's forward + backward took 1.39x the causal one's.)
        """
        dense = 6 * self.num_params(include_embedding=False)
        attention = 12 * self.n_layers * self.dim * seq_len
        return float(dense + attention)

    # --- memory and traffic ------------------------------------------------------------------

    def tp_rejection(self, tp: int) -> tuple[str, int, str] | None:
        """Heads must split evenly: a rank computes with whole heads, and grouped-query attention
        needs each rank's query heads to share that rank's key/value heads. (Other split dims may
        be uneven: DTensor pads them.)"""
        for key in ("n_heads", "n_kv_heads"):
            if getattr(self, key) % tp:
                return (KEY.parallelism.tp, tp,
                        f"does not divide {getattr(KEY.model, key)}={getattr(self, key)}")
        return None

    def activation_bytes_per_token(self, w: Widths, *, tp: int, sequence_parallel: bool,
                                   checkpointing: bool) -> float:
        """Bytes autograd keeps for backward per token of a micro-batch, across the blocks.

        The method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
        Transformer Models", sec. 4.1): count the tensors each op saves, per token, applied to
        this decoder (RMSNorm, GQA, SwiGLU, no dropout) with a fused attention kernel that keeps
        no seq_len x seq_len matrix. Per block and token (h = dim, f = ffn_dim, kv = n_kv_heads x
        head_dim; c, r = compute and residual widths):

          each of the two RMSNorms: its input as fp32 and its scaled output: (4 + r) h
          the normed input of the matmuls that follow: c h, once per norm; but autocast casts an
              fp32 input once per matmul, so then 3 (wq, wk, wv) + 2 (w1, w3) copies
          attention: q, k, v after rotary embedding and the kernel's output, which wo reads in
              place (the kernel writes it token-major, so transposing it back costs no copy):
              c (2h + 2 kv)
          SwiGLU: w1's and w3's outputs, silu's output and the product that w2 saves: c 4f

        Checked against the bytes autograd saves for the model on CPU (tests). Tensor parallel
        splits the attention and SwiGLU terms (each rank has its own heads and ffn columns); the
        rest is replicated, but sequence parallel splits the norms' terms (Korthikanti eq. 2 vs 4)
        while the matmuls still save the gathered input. With activation checkpointing each block
        keeps only its input (r h), and one block's full set is alive while it is recomputed in
        backward. The final norm adds its own terms and the head's input.
        """
        norm_split = tp if sequence_parallel and tp > 1 else 1
        norm = (4 + w.residual) * self.dim / norm_split
        matmul_inputs = (5 if w.residual != w.compute else 2) * w.compute * self.dim
        block = (2 * norm + matmul_inputs
                 + w.compute * (2 * self.dim + 2 * self.kv_dim + 4 * self.ffn_dim) / tp)
        if checkpointing:
            blocks = self.n_layers * w.residual * self.dim / norm_split + block
        else:
            blocks = self.n_layers * block
        final_norm = norm + w.compute * self.dim
        return blocks + final_norm

    def document_mask_bytes_per_token(self, w: Widths, seq_len: int) -> float:
        """The block-causal mask, [B, 1, T, T] in the compute dtype, is made once per forward and
        every layer's attention keeps that one tensor (with activation checkpointing too: it is
        an input of each block): seq_len x compute bytes per token, on every tensor-parallel rank
        (heads split, the mask does not). The rotary tables gathered at each token's position in
        its document, cos and sin [B, T, head_dim / 2] in the parameters' dtype, are kept once
        too. Measured on CPU (tests) and on an H200 (torch 2.11: with grouped heads and a mask,
        cuDNN attention kept q, k, v, the output and the mask, no [T, T] weights)."""
        return seq_len * w.compute + self.head_dim * w.master

    def tp_bytes_per_token(self, w: Widths, *, tp: int, checkpointing: bool) -> float:
        """Bytes one rank sends for tensor parallel per token (Megatron-LM's pattern, Shoeybi et
        al. 2019, sec. 3): each block all-reduces its [tokens, dim] output twice forward
        (attention, SwiGLU) and twice backward, twice more when checkpointing recomputes the
        forward (sequence parallel swaps each all-reduce for an all-gather plus a reduce-scatter,
        the same volume). The vocab-parallel embedding all-reduces its output; the head
        all-gathers its logits forward and all-reduces its input's gradient backward."""
        if tp == 1:
            return 0.0
        hidden = self.dim * w.compute
        per_block = 4 + (2 if checkpointing else 0)
        return (self.n_layers * per_block * ring_allreduce(hidden, tp)
                + ring_allreduce(self.dim * w.residual, tp)  # embedding output
                + ring_gather(self.vocab_size * w.compute, tp)  # logits
                + ring_allreduce(hidden, tp))  # head input's gradient
