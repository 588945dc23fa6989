"""Training-step throughput of a model preset on one accelerator: tokens/s and MFU against the
hardware spec's peak, and the planner's memory estimate against the measured peak.

The step is the one training runs: the model family's own build and `parallelize` on one rank
(its blocks compiled one by one when parallelism.compile=true, checkpointed when
parallelism.activation_checkpointing=true), the project's AdamW and mesh-aware clipping
(`trainer.optim`), under trainer.precision ("bf16-true": bf16 weights; "bf16-mixed": fp32 weights
under autocast). Batches are random token ids already on the device, so the figure is the step
alone, without data loading.

MFU counts the model's FLOPs (the family's `flops_per_token`; for Llama the PaLM convention:
6N + 12 x layers x dim x seq_len per token) against one rank's dense bf16 peak from the hardware
spec. Memory: on CUDA the measured peak is torch.cuda.max_memory_allocated over the timed steps
(the allocator's live tensors, as the planner counts them); on CPU it is the growth of the
process's peak resident memory from before the model was built, which also counts the
allocator's and the compiler's own overhead. The estimate is the planner's
`memory_breakdown` for a one-rank plan of the same config.

    python bench/step.py [--steps 20] [--warmup 5] [--json FILE] [key=value ...]

    # CPU, the tiny preset (default):
    python bench/step.py
    # NVIDIA H100/H200 (the target is 50% MFU or more):
    python bench/step.py hardware=h100 model=llama3_1b trainer.precision=bf16-true \\
        parallelism.compile=true data.seq_len=2048 data.micro_batch_size=4
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from trainer.config import RunConfig, load
from trainer.hardware import GIB, HardwareSpec
from trainer.models.parallel import compile_backend
from trainer.models.registry import family_of, shape_of
from trainer.optim import build_optimizer, clip_grad_norm
from trainer.plan import RunFacts, evaluate, explicit_shape

TARGET_MFU_GPU = 0.5  # issue 3: llama3_1b in bf16 with torch.compile on an H100/H200


@dataclass
class Result:
    model: str
    hardware: str
    device: str
    precision: str
    compiled: bool
    seq_len: int
    micro_batch_size: int
    step_seconds: float  # median of the timed steps
    tokens_per_s: float
    tflops_per_s: float
    mfu: float
    memory_estimate_gib: float
    memory_measured_gib: float
    memory_measure: str
    loss_first: float
    loss_last: float


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first, compilation included (default 5)")
    parser.add_argument("--json", help="also write the result as JSON to this file")
    args, overrides = parser.parse_known_args(argv)
    run = load(["trainer.devices=1", "cluster.nodes=1", "parallelism=ddp", *overrides])
    result = benchmark(run, steps=args.steps, warmup=args.warmup)
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


def benchmark(run: RunConfig, *, steps: int, warmup: int) -> Result:
    device = device_of(run)
    torch.manual_seed(run.seed)
    rss_before = _peak_rss_bytes()
    family, model_args = family_of(run.model), shape_of(run.model)
    dtype = torch.bfloat16 if run.trainer.precision == "bf16-true" else torch.float32
    with torch.device("meta"):
        model = family.build(model_args)
    one_rank = evaluate(RunFacts.of(run), explicit_shape(run),
                        bool(run.parallelism.activation_checkpointing))
    family.parallelize(model, None, one_rank.dims, run.parallelism,
                       backend=compile_backend(device.type))
    model.to_empty(device=device)
    family.init_weights(model, run.seed, device)
    model.to(dtype=dtype)
    optimizer = build_optimizer(model, run.optim)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if run.trainer.precision == "bf16-mixed" else nullcontext())
    batch = (run.data.micro_batch_size, run.data.seq_len + 1)

    def step() -> torch.Tensor:
        tokens = torch.randint(model_args.vocab_size, batch, device=device)
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        clip_grad_norm(model.parameters(), run.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [step() for _ in range(warmup)]
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        _synchronize(device)  # asynchronous devices: the clock must wait for the step
        times.append(time.perf_counter() - start)

    if device.type == "cuda":
        measured, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        measured, how = _peak_rss_bytes() - rss_before, "growth of peak RSS"
    hardware = HardwareSpec(run.hardware)
    step_s = statistics.median(times)
    tokens_per_s = run.data.micro_batch_size * run.data.seq_len / step_s
    flops = tokens_per_s * model_args.flops_per_token(run.data.seq_len)
    return Result(
        model=run.model.name, hardware=run.hardware.name, device=str(device),
        precision=run.trainer.precision, compiled=run.parallelism.compile,
        seq_len=run.data.seq_len, micro_batch_size=run.data.micro_batch_size,
        step_seconds=step_s, tokens_per_s=tokens_per_s, tflops_per_s=flops / 1e12,
        mfu=flops / hardware.peak_flops_per_rank(),
        memory_estimate_gib=memory_estimate(run) / GIB, memory_measured_gib=measured / GIB,
        memory_measure=how, loss_first=losses[0].item(), loss_last=losses[-1].item())


def device_of(run: RunConfig) -> torch.device:
    kind = run.hardware.device_type
    if kind == "cuda" and not torch.cuda.is_available():
        sys.exit(f"hardware={run.hardware.name} is a CUDA device and this machine has none; "
                 "use hardware=cpu (with the tiny preset) here")
    if kind == "neuron":
        sys.exit("bench/step.py measures CUDA or CPU; Neuron steps need torch-neuronx")
    return torch.device(kind, 0) if kind == "cuda" else torch.device("cpu")


def memory_estimate(run: RunConfig) -> float:
    """The planner's bytes per rank for this config on one rank, whether or not it fits."""
    one_rank = evaluate(RunFacts.of(run), explicit_shape(run),
                        bool(run.parallelism.activation_checkpointing))
    return one_rank.estimate.memory_bytes_per_rank


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def report(r: Result) -> None:
    print(f"{r.model} on {r.hardware} ({r.device}), {r.precision}"
          f"{', compiled' if r.compiled else ''}: micro batch {r.micro_batch_size} x seq_len "
          f"{r.seq_len}")
    print(f"  step          {r.step_seconds * 1e3:10.1f} ms (median)")
    print(f"  tokens/s      {r.tokens_per_s:10,.0f}")
    print(f"  TFLOP/s       {r.tflops_per_s:10.2f}")
    print(f"  MFU           {r.mfu:10.1%}  of the spec's dense bf16 peak"
          + (f" (target {TARGET_MFU_GPU:.0%})" if r.device.startswith("cuda") else ""))
    ratio = r.memory_measured_gib / r.memory_estimate_gib if r.memory_estimate_gib else math.nan
    print(f"  memory        {r.memory_measured_gib:10.2f} GiB measured ({r.memory_measure}), "
          f"{r.memory_estimate_gib:.2f} GiB estimated: measured/estimate {ratio:.2f}")
    print(f"  loss          {r.loss_first:.3f} -> {r.loss_last:.3f}")


if __name__ == "__main__":
    sys.exit(main())
