"""What routed experts cost, each figure against a baseline measured in the same run.

- `gemm`: the experts' SwiGLU (forward and backward) as one grouped GEMM (`torch._grouped_mm`)
  against the per-expert loop the trainer falls back to, on the same rows and weights
  (`trainer.models.moe.experts.expert_swiglu`). Needs torch only, so it runs on a machine with
  no Hydra (a GPU host's stock image): `python bench/moe.py gemm --device cuda`.
- `dispatch`: one MoE layer's expert-parallel exchange (dispatch, then combine, forward and
  backward: `trainer.models.moe.experts.Exchange`) on `--ranks` gloo processes started with
  torchrun, against the same layer's expert compute on those rows: what expert parallel adds
  to an MoE layer here.
- `step`: a training step of the MoE preset on one process (the family's own build, the project's
  AdamW and clipping: `bench/step.py`'s step) against a Llama with the same number of active
  parameters per token, the dense model it costs like on paper.

Each side runs alternately after warm-up; medians are reported.

    python bench/moe.py [gemm|dispatch|step ...] [--device cpu|cuda] [--ranks 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def alternate(a, b, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of `a` and `b`, run ABAB... after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for i in range(repeats):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        t1, t2 = timed(first, device), timed(second, device)
        (ta, tb)[first is b].append(t1)
        (ta, tb)[second is b].append(t2)
    return statistics.median(ta), statistics.median(tb)


# ------------------------------------------------------------------------------------------------
# gemm


def gemm(device: torch.device, repeats: int, *, tokens: int, experts: int, top_k: int,
         dim: int, hidden: int) -> dict:
    from trainer.models.moe.experts import expert_swiglu

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    chosen = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=-1).indices.flatten()
    counts = torch.bincount(chosen, minlength=experts).to(device)
    rows = tokens * top_k
    x = torch.randn(rows, dim, generator=gen).to(device, dtype).requires_grad_()
    w1, w3 = (torch.randn(experts, hidden, dim, generator=gen).mul(0.02).to(device, dtype)
              .requires_grad_() for _ in range(2))
    w2 = torch.randn(experts, dim, hidden, generator=gen).mul(0.02).to(device, dtype
                                                                       ).requires_grad_()

    grad = torch.randn(rows, dim, generator=gen).to(device, dtype)  # a dense upstream gradient

    def run(grouped: bool):
        def step():
            expert_swiglu(x, w1, w2, w3, counts, grouped=grouped).backward(grad)
        return step

    with torch.no_grad():  # the two paths must agree before their times mean anything
        a, b = (expert_swiglu(x, w1, w2, w3, counts, grouped=g).float() for g in (True, False))
        agree = ((a - b).norm() / b.norm()).item()
    grouped, loop = alternate(run(True), run(False), device, repeats)
    flops = 3 * 2 * 3 * rows * dim * hidden  # three matmuls, forward + 2x backward
    return {"section": "gemm", "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "rows": rows, "experts": experts, "dim": dim, "hidden": hidden,
            "grouped_vs_loop_rel_diff": agree,
            "grouped_s": grouped, "loop_s": loop, "loop_over_grouped": loop / grouped,
            "grouped_tflops": flops / grouped / 1e12, "loop_tflops": flops / loop / 1e12}


# ------------------------------------------------------------------------------------------------
# dispatch (one torchrun worker per rank)


def dispatch_worker(out: str, repeats: int, tokens: int, experts: int, top_k: int, dim: int,
                    hidden: int) -> None:
    import torch.distributed as dist

    from trainer.models.moe.experts import Exchange, expert_swiglu

    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(rank)
    chosen = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=-1).indices.flatten()
    order = chosen.argsort(stable=True)
    counts = torch.bincount(chosen, minlength=experts)
    x = torch.randn(tokens * top_k, dim, generator=gen)[order].requires_grad_()
    local = experts // ranks
    w1, w3 = (torch.randn(local, hidden, dim, generator=gen).mul(0.02).requires_grad_()
              for _ in range(2))
    w2 = torch.randn(local, dim, hidden, generator=gen).mul(0.02).requires_grad_()
    exchange = Exchange(dist.group.WORLD, ranks)
    received = {}

    def exchange_only():
        rows, _ = exchange.dispatch(x, counts)
        back = exchange.combine(rows)
        back.backward(torch.ones_like(back))
        dist.barrier()

    def compute_only():
        if not received:
            rows, local_counts = exchange.dispatch(x.detach(), counts)
            received.update(rows=rows.detach().requires_grad_(), counts=local_counts)
        out = expert_swiglu(received["rows"], w1, w2, w3, received["counts"], grouped=False)
        out.backward(torch.ones_like(out))
        dist.barrier()

    a, b = alternate(exchange_only, compute_only, device, repeats)
    if rank == 0:
        Path(out).write_text(json.dumps({
            "section": "dispatch", "ranks": ranks, "rows_per_rank": tokens * top_k,
            "dim": dim, "experts": experts, "exchange_s": a, "expert_compute_s": b,
            "exchange_over_compute": a / b,
            "bytes_sent_per_rank": 4 * tokens * top_k * dim * 4 * (ranks - 1) / ranks}))
    dist.destroy_process_group()


def dispatch(ranks: int, repeats: int, **shape) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "dispatch.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", __file__, "dispatch-worker", "--out", out,
               "--repeats", str(repeats),
               *(f"--{k.replace('_', '-')}={v}" for k, v in shape.items())]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        return json.loads(Path(out).read_text())


# ------------------------------------------------------------------------------------------------
# step


def step(repeats: int, overrides: list[str]) -> dict:
    """`model.*` overrides shape the MoE (from `model=moe_tiny`); the rest (hardware, precision,
    data) apply to both sides. The dense side is a Llama of the MoE's width, depth and heads whose
    SwiGLU has the MoE's active width (top_k x moe_ffn_dim)."""
    from bench.step import benchmark
    from trainer.config import load
    from trainer.models.registry import shape_of

    model = [o for o in overrides if o.startswith("model.")]
    common = ["trainer.devices=1", "cluster.nodes=1", "parallelism=ddp", "tracking=none",
              "data.seq_len=128", "data.micro_batch_size=4",
              *(o for o in overrides if not o.startswith("model."))]
    moe_run = load(["model=moe_tiny", *model, *common])
    moe = shape_of(moe_run.model)
    dense_run = load(["model=tiny", f"model.dim={moe.dim}", f"model.n_layers={moe.n_layers}",
                      f"model.n_heads={moe.n_heads}", f"model.n_kv_heads={moe.n_kv_heads}",
                      f"model.ffn_dim={moe.top_k * moe.moe_ffn_dim}",
                      f"model.vocab_size={moe.vocab_size}",
                      f"model.max_seq_len={moe.max_seq_len}", *common])
    dense = shape_of(dense_run.model)
    moe_s, dense_s = [], []
    for i in range(repeats):
        pair = [(moe_run, moe_s), (dense_run, dense_s)]
        for run, times in pair if i % 2 == 0 else pair[::-1]:
            times.append(benchmark(run, steps=5, warmup=2).step_seconds)
    return {"section": "step", "device": moe_run.hardware.device_type,
            "precision": moe_run.trainer.precision, "seq_len": moe_run.data.seq_len,
            "micro_batch_size": moe_run.data.micro_batch_size,
            "moe_active_params": moe.active_params(include_embedding=False),
            "moe_total_params": moe.num_params(include_embedding=False),
            "dense_params": dense.num_params(include_embedding=False),
            "moe_step_s": statistics.median(moe_s), "dense_step_s": statistics.median(dense_s),
            "moe_over_dense": statistics.median(moe_s) / statistics.median(dense_s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", default=["gemm", "dispatch", "step"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out")
    parser.add_argument("--json")
    args, overrides = parser.parse_known_args(argv)
    shape = {"tokens": args.tokens, "experts": args.experts, "top_k": args.top_k,
             "dim": args.dim, "hidden": args.hidden}
    if args.sections == ["dispatch-worker"]:
        dispatch_worker(args.out, args.repeats, **shape)
        return 0
    results = []
    for section in args.sections:
        if section == "gemm":
            results.append(gemm(torch.device(args.device), args.repeats, **shape))
        elif section == "dispatch":
            results.append(dispatch(args.ranks, args.repeats, **shape))
        elif section == "step":
            results.append(step(args.repeats, overrides))
        else:
            parser.error(f"unknown section {section!r}: gemm, dispatch, step")
        print(json.dumps(results[-1], indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
