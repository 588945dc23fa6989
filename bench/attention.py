"""Document masking's attention against plain causal attention, on one GPU (CUDA only).

The same shapes through `torch.nn.functional.scaled_dot_product_attention`: causal (the baseline),
and with the dense block-causal mask the Llama family builds (`block_causal_mask`), letting torch
choose the kernel; also FlexAttention with the same mask as a block mask (compiled), which
ultramesh does not use yet. For each: the bytes autograd keeps for backward and the time of
forward + backward (mean of --repeats after one warm-up), and the ratio to causal.

    python bench/attention.py [--seq-len 8192] [--heads 32] [--kv-heads 8] [--head-dim 128]
                              [--document 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from trainer.models.llama.model import block_causal_mask


def kept_bytes(run: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    saved: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        out = run()
    return sum(saved.values()), out


def measure(run: Callable[[], torch.Tensor], repeats: int) -> tuple[int, float]:
    nbytes, out = kept_bytes(run)
    out.sum().backward()  # the warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run().sum().backward()
    torch.cuda.synchronize()
    return nbytes, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--document", type=int, default=1000, help="tokens per document")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py measures CUDA kernels: no GPU here")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, device, dtype = args.seq_len, "cuda", torch.bfloat16

    def tensor(heads: int) -> torch.Tensor:
        return torch.randn(1, heads, T, args.head_dim, device=device, dtype=dtype,
                           requires_grad=True)

    q, k, v = tensor(args.heads), tensor(args.kv_heads), tensor(args.kv_heads)
    documents = (torch.arange(T, device=device) // args.document)[None].to(torch.int32)
    mask = block_causal_mask(documents, dtype)
    block_mask = create_block_mask(
        lambda b, h, i, j: (documents[0, i] == documents[0, j]) & (j <= i), None, None, T, T,
        device=device)
    flex = torch.compile(flex_attention)
    gqa = args.kv_heads != args.heads
    sides = {
        "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
        "document mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                enable_gqa=gqa),
        "FlexAttention": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa),
    }
    print(f"attention: torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, "
          f"seq_len {T}, {args.heads} heads / {args.kv_heads} kv of {args.head_dim}, documents "
          f"of {args.document} tokens; forward + backward, mean of {args.repeats}")
    base = None
    for name, run in sides.items():
        nbytes, seconds = measure(run, args.repeats)
        base = base or seconds
        print(f"  {name:15s} kept {nbytes / 2**20:8.0f} MiB  {seconds * 1e3:8.2f} ms  "
              f"x{seconds / base:.2f} of causal")


if __name__ == "__main__":
    main()
