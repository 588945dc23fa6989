"""The decoder's shape and the arithmetic that follows from it (parameters, FLOPs per token).

No torch here: the planner, the hardware comparison and the command lines that only plan import
this without paying torch's import time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class ModelArgs:
    """The decoder's shape; field names are the shape keys of `trainer.config.ModelConfig`."""

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

    @classmethod
    def from_config(cls, model_cfg: Any) -> ModelArgs:
        """The shape keys of a `ModelConfig` (or a DictConfig of one); `_target_`, `name` and
        `kwargs` are not part of the shape."""
        return cls(**{f.name: getattr(model_cfg, f.name) for f in fields(cls)})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def num_params(args: ModelArgs, *, include_embedding: bool = True) -> int:
    """Parameter count from the shape alone, without building the model.

    include_embedding=False leaves out the token-embedding table, a lookup that does no
    arithmetic. The output projection stays: it is a matmul over every token. With tied
    embeddings the shared matrix is counted once, as the output projection.
    """
    kv_dim = args.n_kv_heads * args.head_dim
    attention = 2 * args.dim * args.dim + 2 * args.dim * kv_dim  # wq, wo; wk, wv
    feed_forward = 3 * args.dim * args.ffn_dim  # w1, w2, w3
    block = attention + feed_forward + 2 * args.dim  # + two RMSNorm weights
    head = args.dim + args.vocab_size * args.dim  # final norm + output projection
    non_embedding = args.n_layers * block + head
    separate_table = not args.tie_embeddings and include_embedding
    return non_embedding + (args.vocab_size * args.dim if separate_table else 0)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 6N + 12 * n_layers * dim * seq_len.

    The PaLM convention (Chowdhery et al. 2022, appendix B), which torchtitan also uses for MFU:
    each weight does one multiply-add per token in the forward pass and two in the backward (6N,
    N the non-embedding parameters); attention's scores and weighted sum add 2 x 2 x seq_len x dim
    per layer forward (counted the same way in Chinchilla, Hoffmann et al. 2022, appendix F),
    times 3 for forward + backward.
    Causal mask: the attention term counts the full seq_len x seq_len score matrix, as PaLM does,
    although the mask makes half of it unnecessary; a kernel that skips masked blocks does about
    half that work, so MFU from this figure is comparable with published ones, not a hardware count.
    """
    dense = 6 * num_params(args, include_embedding=False)
    attention = 12 * args.n_layers * args.dim * seq_len
    return float(dense + attention)
