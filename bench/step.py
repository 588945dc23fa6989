"""Training-step throughput of a model preset on one accelerator: tokens/s and MFU against the
hardware spec's peak, and the planner's memory estimate against the measured peak.

The step is the one training runs: the model family's own build and `parallelize` on one rank
(its blocks compiled one by one when parallelism.compile=true, checkpointed when
parallelism.activation_checkpointing=true), the project's AdamW and mesh-aware clipping
(`trainer.optim`), under trainer.precision ("bf16-true": bf16 weights; "bf16-mixed": fp32 weights
under autocast). Batches are random token ids already on the device, so the figure is the step
alone, without data loading.

Precisions: under trainer.precision=fp8 / mxfp8 the family's `parallelize` converts its linears
through torchao (emulated on the CPU, which has no fp8 matmuls), the rest runs as bf16-mixed.
`--variant "KEY=VALUE ..."` (repeatable) measures several configs one after another in this
process, the first being the baseline, and prints each one's step time and tokens/s as a ratio
to it, beside the ratio the planner predicts (its step-time estimate for the same one-rank plan).

MFU counts the model's FLOPs (the family's `flops_per_token`; for Llama the PaLM convention:
6N + 12 x layers x dim x seq_len per token) against one rank's dense bf16 peak from the hardware
spec, also under fp8 (as torchtitan's benchmarks say, MFU is not well defined when two peaks are
involved; compare tokens/s). Memory: on CUDA the measured peak is torch.cuda.max_memory_allocated
over the timed steps (the allocator's live tensors, as the planner counts them); on CPU it is the
growth of the process's peak resident memory from before the model was built, which also counts
the allocator's and the compiler's own overhead. The estimate is the planner's
`memory_breakdown` for a one-rank plan of the same config.

    python bench/step.py [--steps 20] [--warmup 5] [--json FILE] [--variant "k=v ..."]...
                         [key=value ...]

    # CPU, the tiny preset (default):
    python bench/step.py
    # NVIDIA H100/H200 (the target is 50% MFU or more):
    python bench/step.py hardware=h100 model=llama3_1b trainer.precision=bf16-true \\
        parallelism.compile=true data.seq_len=2048 data.micro_batch_size=4
    # fp8 against bf16-mixed in one run (bench/gpu_session.sh runs this on a lent GPU):
    python bench/step.py hardware=h200 model=llama3_1b parallelism.compile=true \\
        data.seq_len=2048 data.micro_batch_size=4 --variant trainer.precision=bf16-mixed \\
        --variant trainer.precision=fp8 --variant "trainer.precision=fp8 trainer.fp8_recipe=rowwise"
"""

from __future__ import annotations

import argparse
import gc
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

from trainer.config import LOW_PRECISION_FORMATS, RunConfig, load
from trainer.hardware import GIB, HardwareSpec
from trainer.models.low_precision import LowPrecision
from trainer.models.low_precision import describe as describe_precision
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
    precision: str  # trainer.precision, with fp8's recipe and torchao's emulation said
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
    planned_step_seconds: float  # the planner's estimate for this one-rank plan
    overrides: str = ""  # the --variant that made it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first, compilation included (default 5)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--variant", action="append", default=[], metavar='"KEY=VALUE ..."',
                        help="overrides for one measured config, on top of the others; "
                             "repeat to compare (the first is the baseline)")
    args, overrides = parser.parse_known_args(argv)
    base = ["trainer.devices=1", "cluster.nodes=1", "parallelism=ddp", *overrides]
    results = []
    for variant in args.variant or [""]:
        run = load([*base, *variant.split()])
        results.append(benchmark(run, steps=args.steps, warmup=args.warmup, overrides=variant))
        report(results[-1])
        if args.json:  # after each variant: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"results": [asdict(r) for r in results],
                           "ratios": ratios(results)}, f, indent=2)
    if len(results) > 1:
        report_ratios(results)
    return 0


def benchmark(run: RunConfig, *, steps: int, warmup: int, overrides: str = "") -> Result:
    device = device_of(run)
    _release(device)  # what the previous variant held
    torch.manual_seed(run.seed)
    rss_before = _peak_rss_bytes()
    family, model_args = family_of(run.model), shape_of(run.model)
    dtype = torch.bfloat16 if run.trainer.precision == "bf16-true" else torch.float32
    with torch.device("meta"):
        model = family.build(model_args)
    one_rank = evaluate(RunFacts.of(run), explicit_shape(run),
                        bool(run.parallelism.activation_checkpointing))
    family.parallelize(model, None, one_rank.dims, run.parallelism,
                       backend=compile_backend(device.type),
                       low_precision=LowPrecision.of(run, fsdp=False))
    model.to_empty(device=device)
    family.init_weights(model, run.seed, device)
    model.to(dtype=dtype)
    optimizer = build_optimizer(model, run.optim)
    # fp8 / mxfp8: the linears torchao converted aside, the step is bf16-mixed's
    mixed = run.trainer.precision in ("bf16-mixed", *LOW_PRECISION_FORMATS)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mixed else nullcontext()
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
        precision=describe_precision(run, fsdp=False), compiled=run.parallelism.compile,
        seq_len=run.data.seq_len, micro_batch_size=run.data.micro_batch_size,
        step_seconds=step_s, tokens_per_s=tokens_per_s, tflops_per_s=flops / 1e12,
        mfu=flops / hardware.peak_flops_per_rank(),
        memory_estimate_gib=memory_estimate(run) / GIB, memory_measured_gib=measured / GIB,
        memory_measure=how, loss_first=losses[0].item(), loss_last=losses[-1].item(),
        planned_step_seconds=one_rank.estimate.step_seconds, overrides=overrides)


def ratios(results: list[Result]) -> list[dict[str, float | str]]:
    """Each result against the first: measured and planned step-time speed-ups (baseline step /
    this step), tokens/s ratio."""
    base = results[0]
    return [{"variant": r.overrides or "(as given)", "precision": r.precision,
             "speedup_measured": base.step_seconds / r.step_seconds,
             "speedup_planned": base.planned_step_seconds / r.planned_step_seconds,
             "tokens_per_s_ratio": r.tokens_per_s / base.tokens_per_s} for r in results]


def report_ratios(results: list[Result]) -> None:
    print(f"against the baseline ({results[0].precision}), same process, same batch:")
    for row in ratios(results):
        print(f"  {row['precision']:<58} speed-up {row['speedup_measured']:5.2f} measured, "
              f"{row['speedup_planned']:5.2f} planned")


def _release(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs hold the previous variant's modules
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


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
