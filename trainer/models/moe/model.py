"""A Qwen3-MoE-shaped decoder: Llama's pre-norm blocks with grouped-query attention whose queries
and keys are RMS-normalised per head (Qwen3), and SwiGLU feed-forwards replaced, in the layers
`MoEArgs.is_moe_layer` names, by a router and `n_experts` routed experts (plus optional shared
experts every token visits, DeepSeek-style).

Routing is Qwen3-MoE's: softmax over all experts in fp32, the top_k by probability, their
probabilities (rescaled to sum to one with norm_topk_prob) weighting the experts' outputs. Two
load-balancing mechanisms, each on its own key:
- an auxiliary loss, aux_loss_coef x E x sum_e f_e P_e (Switch Transformer's form, Fedus et al.
  2022, eq. 4), computed per sequence and averaged, as DeepSeek-V3's complementary sequence-wise
  loss is (DeepSeek-AI 2024, eq. 17-20): f_e the share of the sequence's routed copies sent to
  expert e, P_e its mean probability over the sequence. Per sequence, the mean over a batch is
  the same however the batch is split over ranks, so a sharded run equals a one-process run;
  `auxiliary_loss()` is what the training step adds to the cross entropy;
- DeepSeek-V3's auxiliary-loss-free balancing (sec. 2.1.2): a per-expert bias added to the
  probabilities for choosing the top_k only (the weights stay the probabilities), moved after
  every optimizer step by bias_update_rate x sign(mean load - expert load), the load counted
  over the whole global batch (one all-reduce of [layers, experts] counts per step).

Rotary embeddings rotate the two halves of each head (Hugging Face's `rotate_half`), the layout
of Qwen's released weights, so they load without permutation. Like Llama's module, the
constructor may run on the meta device, `init_weights(seed)` fills every shard from the seed
alone (the 3-D expert tensors per expert, `trainer.models.init`), and the distribution lives
outside, in `parallelize.py`, which hands the experts their expert-parallel group and
tensor-parallel mesh.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate

from trainer.models import init
from trainer.models.llama.model import (
    INIT_STD,
    FeedForward,
    RMSNorm,
    rotary_and_mask,
    rotary_tables,
)
from trainer.models.moe.experts import Exchange, expert_swiglu, inverse
from trainer.models.moe.shape import MoEArgs


def apply_rotary_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pair (x[i], x[i + head_dim/2]) of x [B, T, heads, head_dim] by its angle, in fp32
    (Hugging Face's rotate_half layout, Qwen's); cos and sin are [T, head_dim / 2] or, for
    positions per document, [B, T, head_dim / 2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class HeadNorm(RMSNorm):
    """RMSNorm over each head of q or k, one weight for every head. Under tensor parallel a rank
    sees only its heads, so its gradient for the shared weight is partial: `tp_mesh` (set by
    `parallelize`) sums it over the tp ranks in backward (Hugging Face's tensor-parallel plan
    calls these weights "replicated_with_grad_allreduce")."""

    tp_mesh: DeviceMesh | None = None

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * tp_enter(self.weight, self.tp_mesh)


class Attention(nn.Module):
    """Causal grouped-query attention with per-head RMSNorm on queries and keys (Qwen3); with a
    mask (Llama's `block_causal_mask`), limited to each token's document."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.head_dim = args.head_size
        self.wq = nn.Linear(args.dim, args.q_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wo = nn.Linear(args.q_dim, args.dim, bias=False)
        self.q_norm = HeadNorm(args.head_size, args.norm_eps)
        self.k_norm = HeadNorm(args.head_size, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallel this rank holds only its column shard of wq/wk/wv
        q = self.q_norm(self.wq(x).view(B, T, -1, self.head_dim))
        k = self.k_norm(self.wk(x).view(B, T, -1, self.head_dim))
        q, k = apply_rotary_halves(q, cos, sin), apply_rotary_halves(k, cos, sin)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=k.size(1) != q.size(1))
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Router(nn.Module):
    """Scores each token's experts and picks its top_k. Keeps, on the device and never read on
    the hot path, the tokens each expert got since the last optimizer step (for the bias update)
    and since the last metrics read, and the auxiliary losses of the window."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.top_k, self.n_experts = args.top_k, args.n_experts
        self.norm_topk_prob = args.norm_topk_prob
        self.aux_loss_coef, self.bias_update_rate = args.aux_loss_coef, args.bias_update_rate
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)
        # the balance bias is state that training changes: saved in checkpoints
        self.register_buffer("expert_bias", torch.zeros(args.n_experts, dtype=torch.float32))
        for name in ("step_tokens", "window_tokens"):
            self.register_buffer(name, torch.zeros(args.n_experts, dtype=torch.float32),
                                 persistent=False)
        self.register_buffer("window_aux", torch.zeros(2, dtype=torch.float32),
                             persistent=False)  # sum, count
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor, n_sequences: int) -> tuple[Tensor, Tensor]:
        """x [tokens, dim], `n_sequences` sequences of equal length one after the other.
        Returns the routing weights and the chosen experts, each [tokens, top_k]."""
        probs = self.gate(x).float().softmax(dim=-1)
        scores = probs + self.expert_bias if self.bias_update_rate else probs
        chosen = scores.topk(self.top_k, dim=-1).indices
        weights = probs.gather(-1, chosen)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.aux_loss = None
        if not self.training:  # evaluation moves no bias and adds no balancing loss
            return weights, chosen
        with torch.no_grad():
            # activation checkpointing recomputes this forward: every count then doubles, which
            # leaves what is read from them (signs against the mean, max over mean) unchanged
            counts = torch.zeros(self.n_experts, device=x.device).scatter_add_(
                0, chosen.reshape(-1), torch.ones(chosen.numel(), device=x.device))
            self.step_tokens += counts.to(self.step_tokens.dtype)
            self.window_tokens += counts.to(self.window_tokens.dtype)
        if self.aux_loss_coef:
            self.aux_loss = self._aux_loss(probs, chosen, n_sequences)
        return weights, chosen

    def _aux_loss(self, probs: Tensor, chosen: Tensor, n_sequences: int) -> Tensor:
        """aux_loss_coef x E x mean over sequences of sum_e f_e P_e (module docstring)."""
        seq_len = probs.shape[0] // n_sequences
        per_seq = torch.zeros(n_sequences, self.n_experts, device=probs.device).scatter_add_(
            1, chosen.view(n_sequences, -1),
            torch.ones(n_sequences, seq_len * self.top_k, device=probs.device))
        share = per_seq / (seq_len * self.top_k)
        mean_prob = probs.view(n_sequences, seq_len, -1).mean(dim=1)
        loss = self.aux_loss_coef * self.n_experts * (share * mean_prob).sum(-1).mean()
        with torch.no_grad():
            self.window_aux += torch.stack((loss.detach(), torch.ones_like(loss))).to(
                self.window_aux.dtype)
        return loss


def tp_enter(x: Tensor, tp_mesh: DeviceMesh | None) -> Tensor:
    """Identity forward; backward sums the partial gradients that each tensor-parallel rank's
    share of the experts computes (Megatron's copy-to-tensor-parallel region)."""
    if tp_mesh is None:
        return x
    return DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False).to_local(
        grad_placements=[Partial()])


def tp_exit(x: Tensor, tp_mesh: DeviceMesh | None) -> Tensor:
    """All-reduce forward (each tp rank holds a partial sum over its hidden columns); identity
    backward (Megatron's reduce-from-tensor-parallel region)."""
    if tp_mesh is None:
        return x
    return DTensor.from_local(x, tp_mesh, [Partial()], run_check=False).redistribute(
        placements=[Replicate()]).to_local()


class Experts(nn.Module):
    """n_experts SwiGLU experts as three 3-D tensors, [experts, out, in] each (nn.Linear's
    layout per expert). `parallelize` may split them over expert-parallel ranks (whole experts,
    dim 0) and tensor-parallel ones (each expert's hidden size) and sets `ep_group` and
    `tp_mesh`; the forward then computes this rank's experts for the tokens routed to them."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        e, d, f = args.n_experts, args.dim, args.moe_ffn_dim
        self.w1 = nn.Parameter(torch.empty(e, f, d))  # gate
        self.w2 = nn.Parameter(torch.empty(e, d, f))  # down
        self.w3 = nn.Parameter(torch.empty(e, f, d))  # up
        self.ep_group: ProcessGroup | None = None
        self.ep = 1
        self.tp_mesh: DeviceMesh | None = None
        self.grouped_mm: bool | None = None  # None: where the device has it

    def forward(self, x: Tensor, weights: Tensor, chosen: Tensor) -> Tensor:
        """x [tokens, dim] (whole on every tp rank), weights and chosen [tokens, top_k]."""
        top_k = chosen.shape[1]
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # routed copies, grouped by expert
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        rows = tp_enter(x, self.tp_mesh)[order // top_k]
        exchange = Exchange(self.ep_group, self.ep) if self.ep > 1 else None
        if exchange is not None:
            rows, counts = exchange.dispatch(rows, counts)
        w1, w2, w3 = (_local(w, self.ep) for w in (self.w1, self.w2, self.w3))
        out = expert_swiglu(rows, w1, w2, w3, counts, grouped=self.grouped_mm)
        if exchange is not None:
            out = exchange.combine(out)
        out = out[inverse(order)].view(*chosen.shape, -1)
        weights = tp_enter(weights, self.tp_mesh).to(out.dtype)
        out = (out * weights.unsqueeze(-1)).sum(dim=1)
        return tp_exit(out, self.tp_mesh).to(x.dtype)

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]


def _local(w: Tensor, ep: int) -> Tensor:
    """This rank's experts (and hidden columns) of an expert tensor. Under expert parallel its
    gradient is the sum over the tokens of ep data-parallel ranks, which FSDP then averages
    over the others only: scaled by 1 / ep here, it comes out the mean over all of them."""
    local = w.to_local() if isinstance(w, DTensor) else w
    if ep > 1 and local.requires_grad:
        local.register_hook(lambda grad: grad / ep)
    return local


class MoE(nn.Module):
    def __init__(self, args: MoEArgs):
        super().__init__()
        self.router = Router(args)
        self.experts = Experts(args)
        self.shared = (FeedForward(args.dim, args.shared_ffn_dim)
                       if args.n_shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, chosen = self.router(flat, n_sequences=B)
        out = self.experts(flat, weights, chosen)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, T, D)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention, then a SwiGLU (`feed_forward`) or an MoE (`moe`)."""

    def __init__(self, args: MoEArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if args.is_moe_layer(layer):
            self.moe = MoE(args)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        mlp = self.moe if hasattr(self, "moe") else self.feed_forward
        return x + mlp(self.ffn_norm(x))


class Transformer(nn.Module):
    """Token ids [B, T] to next-token logits [B, T, vocab_size]; with `documents` [B, T], attention
    and positions are per document. `auxiliary_loss()` after a training forward gives the
    balancing loss the training step adds."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, i)
                                     for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rotary_tables(args.head_size, args.max_seq_len, args.rope_theta)
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

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def auxiliary_loss(self) -> Tensor | None:
        """The balancing loss of the last forward, summed over MoE layers (None when off)."""
        losses = [r.aux_loss for r in self.routers() if r.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """DeepSeek-V3's bias update from the step's expert loads, summed over every rank (tp
        peers count the same tokens: the sign against the mean does not change). No host sync."""
        routers = self.routers()
        rate = self.args.bias_update_rate
        if not routers or not rate:
            return
        loads = torch.stack([r.step_tokens for r in routers])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loads)
        change = rate * torch.sign(loads.mean(dim=-1, keepdim=True) - loads)
        for router, delta in zip(routers, change, strict=True):
            router.expert_bias += delta
            router.step_tokens.zero_()

    @torch.no_grad()
    def router_metrics(self) -> dict[str, Tensor]:
        """Per MoE layer, on the device: the busiest expert's tokens over the mean since the last
        call (over every rank), and the spread of the balance bias; the window's mean auxiliary
        loss. Reading them (one all-reduce) resets the window: call at the log cadence."""
        named = [(key, m.moe.router) for key, m in self.layers.items() if hasattr(m, "moe")]
        if not named:
            return {}
        loads = torch.stack([r.window_tokens for _, r in named])
        aux = torch.stack([r.window_aux for _, r in named]).sum(0)
        if dist.is_available() and dist.is_initialized():
            both = torch.cat((loads.flatten(), aux))
            dist.all_reduce(both)
            loads, aux = both[:loads.numel()].view_as(loads), both[loads.numel():]
        imbalance = loads.amax(-1) / loads.mean(-1).clamp(min=1e-9)
        metrics: dict[str, Tensor] = {}
        for (key, router), ratio in zip(named, imbalance, strict=True):
            metrics[f"router/layer{key}/load_max_over_mean"] = ratio
            metrics[f"router/layer{key}/bias_spread"] = (router.expert_bias.amax()
                                                         - router.expert_bias.amin())
            router.window_tokens.zero_()
            router.window_aux.zero_()
        if self.args.aux_loss_coef:
            metrics["router/aux_loss"] = aux[0] / aux[1].clamp(min=1)
        return metrics

    def init_weights(self, seed: int = 0, buffer_device: torch.device | str | None = None) -> None:
        """(Re)initialise every parameter, the rotary tables and the routers' state, as Llama's
        `init_weights` does: N(0, 0.02^2) from the seed and each parameter's name (each expert
        of a 3-D tensor drawn as its own matrix), residual projections (wo, w2) shrunk by
        depth, norms at one, balance biases at zero."""
        args = self.args
        device = buffer_device if buffer_device is not None else self.rope_cos.device
        self.rope_cos, self.rope_sin = rotary_tables(args.head_size, args.max_seq_len,
                                                     args.rope_theta, device)
        for router in self.routers():  # fp32 whatever the parameters': the bias moves by 1e-3
            for name, buffer in router.named_buffers(recurse=False):
                setattr(router, name, torch.zeros(buffer.shape, device=device,
                                                  dtype=torch.float32))
        residual_std = init.output_std(INIT_STD, args.n_layers)
        for name, param in self.named_parameters():
            key = init.canonical_name(name)
            if key.endswith("norm.weight"):
                init.fill_ones_(param)
            else:
                std = residual_std if key.endswith(("wo.weight", "w2.weight", "w2")) else INIT_STD
                init.fill_normal_(param, key, seed, std)
