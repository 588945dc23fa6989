"""A Llama-style decoder, short enough to read in one sitting.

RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU feed-forward: the Llama 3
recipe (Grattafiori et al. 2024, "The Llama 3 Herd of Models"). Nothing here knows about
distribution. `trainer/models/llama/parallelize.py` applies tensor parallel, FSDP2, activation
checkpointing and torch.compile from outside, which is why the model keeps to a few rules:

- every projection is a bias-free `nn.Linear` with a stable name (wq, wk, wv, wo, w1, w2, w3), so a
  tensor-parallel plan can name it as ColwiseParallel or RowwiseParallel;
- heads are counted from the tensor (`view(B, T, -1, head_dim)`), never from the config, so a rank
  that holds a column shard of wq/wk/wv computes with just its own heads;
- blocks live in an `nn.ModuleDict` keyed "0".."n-1", so each can be wrapped or replaced by key;
- rotary tables are real cos/sin buffers (no complex dtype), kept out of checkpoints;
- given which document each token is in (`documents`, from the data), attention is block-causal
  (a token sees the earlier tokens of its own document only) and positions restart at each
  document, so a packed sequence computes what each of its documents would alone;
- the constructor may run on the meta device: `init_weights(seed)` fills every parameter and
  buffer afterwards, each shard with the values the whole tensor would have (`trainer.models.init`),
  so the initial weights depend on the seed and never on the mesh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models import init
from trainer.models.llama.shape import LlamaArgs

INIT_STD = 0.02  # GPT-2's initialisation scale, which Llama reference implementations keep


def rotary_tables(head_dim: int, max_seq_len: int, theta: float,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin of every (position, pair) angle, each [max_seq_len, head_dim / 2].

    Pair i turns at frequency theta^(-2i / head_dim) (Su et al. 2021, RoFormer, eq. 15).
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                          / head_dim)
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x [B, T, heads, head_dim] by its angle;
    cos and sin are [T, head_dim / 2] (positions 0..T-1) or [B, T, head_dim / 2] (any positions).

    Adjacent pairs, not halves, match the layout of Meta's released Llama weights. The rotation
    runs in float32 so that under bf16 it adds no rounding of its own.
    """
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """Scale by the reciprocal root mean square (Zhang & Sennrich 2019); no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # float32 for the mean of squares: in bf16 its rounding error would scale every feature
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight



def document_positions(documents: Tensor) -> Tensor:
    """int64 [B, T]: each token's position in its own document (documents: [B, T], a row's
    document numbers, non-decreasing)."""
    index = torch.arange(documents.size(1), device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def block_causal_mask(documents: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, 1, T, T] additive mask: 0 where query i may see key j (j <= i, same document), -inf
    elsewhere. Made once per forward in the dtype attention computes in, so every layer's
    attention keeps this one tensor for backward rather than a converted copy each."""
    T = documents.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    allowed = (documents[:, :, None] == documents[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=documents.device)
    return mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)


def rotary_and_mask(documents: Tensor | None, cos: Tensor, sin: Tensor, seq_len: int,
                    h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """The rotary tables for a forward over `seq_len` tokens and its attention mask: the first
    seq_len rows and plain causal attention (None), or with `documents` each token's row at its
    position in its document and the block-causal mask in the dtype attention computes in."""
    if documents is None:
        return cos[:seq_len], sin[:seq_len], None
    positions = document_positions(documents)
    return cos[positions], sin[positions], block_causal_mask(documents, _attention_dtype(h))


class Attention(nn.Module):
    """Causal grouped-query attention: n_heads query heads share n_kv_heads key/value heads.
    With a mask (`block_causal_mask`), attention is limited to each token's document."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.head_dim = args.head_dim
        kv_dim = args.n_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, args.dim, bias=False)
        self.wk = nn.Linear(args.dim, kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, kv_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallel this rank holds only its column shard of wq/wk/wv
        q = apply_rotary(self.wq(x).view(B, T, -1, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(B, T, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA takes [B, heads, T, head_dim]
        # enable_gqa only when heads are shared: with it, CUDA offers just the flash and math
        # kernels (torch's SDPA docs), so plain multi-head attention keeps every kernel. With a
        # mask and shared heads, torch 2.11 on an H200 ran cuDNN attention, which keeps no
        # [T, T] weights (measured: docs/data.md, "Document masking").
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=k.size(1) != q.size(1))
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x), w1 the gate, w3 the up projection."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed_forward(norm(x))."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Token ids [B, T] to next-token logits [B, T, vocab_size]; with `documents` [B, T] (which
    document of its row each token is in) attention and positions are per document."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # derived from args, so recomputed rather than saved: persistent=False
        cos, sin = rotary_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def forward(self, tokens: Tensor, documents: Tensor | None = None) -> Tensor:
        seq_len = tokens.size(1)
        if seq_len > self.args.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds "
                             f"max_seq_len={self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        cos, sin, mask = rotary_and_mask(documents, self.rope_cos, self.rope_sin, seq_len, h)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        return self.output(self.norm(h))

    def init_weights(self, seed: int = 0, buffer_device: torch.device | str | None = None) -> None:
        """(Re)initialise every parameter and the rotary tables.

        Each parameter is drawn from `seed` and its own name (`trainer.models.init`), so a rank
        that holds a shard fills just that shard, with the values one process would draw for the
        whole model. Embeddings and input projections get N(0, 0.02^2); the projections into the
        residual stream (wo, w2) a std shrunk by depth; norms start at one. After `to_empty()` the
        rotary buffers hold garbage and tied weights are two tensors again: both are restored here.
        """
        args = self.args
        device = buffer_device if buffer_device is not None else self.rope_cos.device
        self.rope_cos, self.rope_sin = rotary_tables(args.head_dim, args.max_seq_len,
                                                     args.rope_theta, device)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        residual_std = init.output_std(INIT_STD, args.n_layers)
        for name, param in self.named_parameters():
            key = init.canonical_name(name)
            if key.endswith("norm.weight"):
                init.fill_ones_(param)
            else:
                std = residual_std if key.endswith(("wo.weight", "w2.weight")) else INIT_STD
                init.fill_normal_(param, key, seed, std)


def _attention_dtype(h: Tensor) -> torch.dtype:
    """The dtype attention's inputs have: autocast's where it is on, else the stream's."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return h.dtype
