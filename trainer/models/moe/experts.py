"""Routed experts: the SwiGLU of every expert at once (grouped GEMM, or a loop where the device
has none), and expert parallel's token exchange (dispatch and combine by all-to-all).

Tokens reach their experts dropless: every routed copy is computed, however unbalanced the
routing. That makes the exchange's sizes known only after routing, so each MoE layer copies its
per-rank token counts to the host once (one small device-to-host copy, as in torchtitan's and
Megatron's dropless paths) to size the all-to-all; NVIDIA's DeepEP/HybridEP kernels avoid that
copy and are not used here. The exchange goes through torch's autograd-aware functional
collectives, so backward runs the reverse exchange: gloo on CPU, NCCL on CUDA, the neuron backend
on Trainium (untested here).

Under FakeTensorMode (`trainer.validate_plan`) no count has a value: routing is taken as even,
every expert receiving its mean share, which is what the planner's estimate assumes at
plan.expert_load=1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.distributed import ProcessGroup
from torch.distributed._functional_collectives import all_to_all_single_autograd

# torch._grouped_mm runs on CUDA from compute capability 9.0 (Hopper) in bf16; its CPU kernel
# exists in torch 2.13 but fails in backward when an expert receives no token, so the CPU (and
# any other device) takes the per-expert loop.
GROUPED_MM_CAPABILITY = (9, 0)


def grouped_mm_available(x: Tensor) -> bool:
    """On CUDA from Hopper in bf16; and for bf16 fake tensors (`trainer.validate_plan`), where
    it is three shape computations instead of three per expert, and what a GPU run executes."""
    if x.dtype != torch.bfloat16:
        return False
    return is_fake(x) or (x.device.type == "cuda" and torch.cuda.get_device_capability(
        x.device) >= GROUPED_MM_CAPABILITY)


def host_counts(counts: Tensor, total: int) -> list[int]:
    """`counts` as Python ints (the one device-to-host copy of a layer), or, for fake tensors,
    `total` split evenly over them."""
    if is_fake(counts) or counts.is_meta:
        n = counts.numel()
        return [total // n + (1 if i < total % n else 0) for i in range(n)]
    return counts.tolist()


def expert_swiglu(x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, counts: Tensor, *,
                  grouped: bool | None = None) -> Tensor:
    """w2_e(silu(w1_e x) * w3_e x) for each row x, e the expert of its group: `x` [N, dim] holds
    the rows of expert 0, then expert 1, ..., `counts` [E] of each; w1/w3 [E, hidden, dim] and
    w2 [E, dim, hidden], nn.Linear's [out, in] per expert. `grouped` forces the grouped GEMM
    (True) or the loop (False); None picks by device (`grouped_mm_available`)."""
    if torch.is_autocast_enabled(x.device.type):
        # autocast would cast each expert's slice of the weights on every call, and keep each
        # copy for backward: cast the stacks once, as it casts a whole nn.Linear weight
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return expert_swiglu(*(t.to(dtype) for t in (x, w1, w2, w3)), counts,
                                 grouped=grouped)
    if grouped if grouped is not None else grouped_mm_available(x):
        offsets = counts.cumsum(0).to(torch.int32)
        gate = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets)
        up = torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)
    outputs = []
    for e, rows in enumerate(x.split(host_counts(counts, x.shape[0]))):
        outputs.append(F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]), w2[e]))
    return torch.cat(outputs)


class Exchange:
    """One MoE layer's expert-parallel exchange: `dispatch` sends each routed copy (sorted by
    expert) to the rank that holds its expert and returns what this rank received, grouped by
    its local experts; `combine` sends the results back in the order dispatch took them."""

    def __init__(self, group: ProcessGroup, ep: int):
        self.group, self.ep = group, ep

    def dispatch(self, x: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """`x` [N, dim] sorted by global expert, `counts` [E] per expert. Returns the received
        rows grouped by local expert and the counts [E / ep] of each."""
        ep = self.ep
        local = counts.numel() // ep
        send = counts.view(ep, local)  # [destination rank, its local expert]
        received = torch.empty_like(send)
        # fixed size: every rank learns how many rows of each of its experts each peer sends
        torch.distributed.all_to_all_single(received.view(-1), send.reshape(-1),
                                            group=self.group)
        sizes = host_counts(torch.cat((send.sum(1), received.sum(1))), 2 * x.shape[0])
        self.in_splits, self.out_splits = sizes[:ep], sizes[ep:]
        rows = all_to_all_single_autograd(x, self.out_splits, self.in_splits, self.group)
        # received: [source 0: expert 0..local-1][source 1: ...]; regroup by local expert
        expert_of_segment = torch.arange(local, device=x.device).repeat(ep)
        expert_of_row = expert_of_segment.repeat_interleave(received.view(-1),
                                                            output_size=rows.shape[0])
        self.order = expert_of_row.argsort(stable=True)
        return rows[self.order], received.sum(0)

    def combine(self, y: Tensor) -> Tensor:
        """`y` [rows received, dim] in dispatch's grouping, back to the ranks that sent them."""
        return all_to_all_single_autograd(y[inverse(self.order)], self.in_splits,
                                          self.out_splits, self.group)


def inverse(order: Tensor) -> Tensor:
    """The permutation that undoes `order`: x[order][inverse(order)] == x."""
    undo = torch.empty_like(order)
    undo[order] = torch.arange(order.numel(), device=order.device)
    return undo
