"""What ultramesh adds to a training step, against a hand-written PyTorch loop, measured in one run.

Both sides train the same model from the same initial weights (`init_weights(seed)`, as the
module does after building on `meta`) on the same batches (the same `TokenLoader`) with the same
optimizer, schedule and clipping (`trainer.optim`), on the same number of threads; their final
losses must agree (the report says so, and warns when they do not). The ultramesh side is the real
path a user runs, `trainer.fit.fit()`, with its step metrics, its progress lines and MLflow
tracking to a local SQLite store on, and periodic checkpoints off (the one at the end stays, as in
every run).

- `--ranks 1` (default): both sides in this process.
- `--ranks 4`: both sides as 4 torchrun processes on the CPU (gloo), `parallelism=fsdp_tp`
  (FSDP2 over 2 ranks x tensor parallel over 2) unless the overrides say otherwise. The ultramesh
  side is `fit()` on every rank, as `torchrun -m trainer` runs it; the hand loop builds the same
  mesh, calls the same `parallelize()` and optimizer, and reads its data-parallel slice of each
  batch. Rank 0's clock is read.

Step time is measured from inside: the clock is read at the end of every batch, and the steps
compared are the 2nd to the (N-1)th, so start-up (Trainer construction, the MLflow run) and the
end (the final checkpoint, closing the run) are reported apart from it. Beside wall-clock time,
the CPU time of the (rank 0) process per step is reported: other jobs on a shared machine stretch
the first but hardly the second (with `--threads 1`, where no thread spins waiting for another).
The two sides run alternately, `--repeats` rounds after one warm-up round, in alternating order;
the figures to read are the ratios, measured in this one run.

    python bench/overhead.py [--ranks 1|4] [--steps 60] [--repeats 5] [--threads N]
                             [--default-run] [key=value ...]

Config overrides apply to both sides: `model.dim=32 model.n_layers=1 data.seq_len=16` makes the
step almost free, so what is left of the difference is the fixed cost per step. `--default-run`
also runs `python -m trainer` with no arguments in a temporary directory (a few minutes) and
prints its peak resident memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import trainer.fit
from trainer.config import RunConfig, compose, validate
from trainer.data.datamodule import TokenDataModule
from trainer.data.sampler import Batch, TokenLoader
from trainer.models.registry import family_of, shape_of
from trainer.optim import build_optimizer, build_scheduler, clip_grad_norm

# The framework may add at most this to a step: 3% on one process (issue 2), 2% on a sharded mesh
# (issue 15), where the step itself costs more.
TARGET_RATIO = {1: 1.03, 4: 1.02}
SHARDED = ["parallelism=fsdp_tp", "parallelism.dp_shard=2", "parallelism.tp=2"]


def mark() -> tuple[float, float]:
    """Wall-clock seconds, and CPU seconds of every thread of this process (the part of the time
    that other people's jobs on a shared machine do not stretch, as long as threads do not spin)."""
    return time.perf_counter(), time.process_time()


@dataclass
class Timing:
    """One training run seen from inside: when its steps ended, and what came before and after."""

    startup_s: float  # from the call to the first batch
    ends: list[tuple[float, float]]  # mark() at the end of every step
    end_s: float  # the last step (the final checkpoint on the ultramesh side) and closing down
    loss: float  # mean loss of the last logging window, to show both sides trained alike

    # Steps 2..N-1 are compared: step 1 has no start mark, step N carries the end's work.

    @property
    def steps_s(self) -> list[float]:
        """Wall-clock duration of each compared step."""
        return [b[0] - a[0] for a, b in itertools.pairwise(self.ends[:-1])]

    @property
    def mean_step_s(self) -> float:
        return (self.ends[-2][0] - self.ends[0][0]) / (len(self.ends) - 2)

    @property
    def cpu_step_s(self) -> float:
        return (self.ends[-2][1] - self.ends[0][1]) / (len(self.ends) - 2)


class BatchClock(pl.Callback):
    """Reads the clock when the first batch starts and when every batch has ended. Attached
    through the module's `configure_callbacks`, so Lightning runs it after ultramesh's own
    callbacks: their work lands inside the measured step."""

    def __init__(self) -> None:
        self.first_batch_start: float | None = None
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch_start is None:
            self.first_batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(mark())


def bench_config(steps: int, store: Path, extra: list[str], ranks: int = 1
                 ) -> tuple[RunConfig, dict]:
    """The default run shortened to `steps` on `ranks` processes (sharded as `SHARDED` says when
    several), tracking to `store`, no periodic checkpoints, and the user's `extra` overrides."""
    mesh = [f"trainer.devices={ranks}", *SHARDED] if ranks > 1 else []
    overrides = [f"trainer.max_steps={steps}", f"tracking.uri=sqlite:///{store}",
                 "checkpoint.every_n_steps=0", *mesh, *extra]
    cfg = compose(overrides)
    return validate(cfg), OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def last_window(run: RunConfig) -> int:
    """How many steps the monitor's final loss averages: those since its last emit."""
    every = run.trainer.log_every_n_steps
    return run.trainer.max_steps % every or every


def run_ultramesh(run: RunConfig, resolved: dict, run_dir: Path) -> Timing:
    clock = BatchClock()
    start = time.perf_counter()
    result = trainer.fit.fit(run, run_dir=run_dir, resolved=resolved, overrides=[],
                             callbacks=[clock])
    done = time.perf_counter()
    assert clock.first_batch_start is not None
    return Timing(startup_s=clock.first_batch_start - start, ends=clock.ends,
                  end_s=done - clock.ends[-2][0],
                  loss=result.metrics.get("train/loss", float("nan")))


def endless(loader: TokenLoader) -> Iterator[Batch]:
    """Batches across epochs, as Lightning draws them: iterating again starts the next epoch."""
    while True:
        yield from loader


def run_hand_loop(run: RunConfig) -> Timing:
    """The loop a person would write around the same pieces, with nothing else in it: on one
    process the plain model; on several, the plan's mesh and `parallelize()`, built on `meta` and
    initialised shard by shard as the module does."""
    start = time.perf_counter()
    family, shape = family_of(run.model), shape_of(run.model)
    # the same batches as the run's, documents included where it masks attention by document
    data = TokenDataModule(run.data, seed=run.seed, document_mask=run.uses_document_mask)
    if run.world_size == 1:
        model = family.build(shape)
        family.init_weights(model, run.seed, "cpu")
        loader = data.train_dataloader()
    else:
        from trainer.mesh import build_mesh, data_parallel_rank
        from trainer.plan import choose

        dims = choose(run).dims
        mesh = build_mesh(dims, "cpu")
        with torch.device("meta"):
            model = family.build(shape)
        family.parallelize(model, mesh, dims, run.parallelism)
        model.to_empty(device="cpu")
        family.init_weights(model, run.seed, "cpu")
        replicas, rank = data_parallel_rank(mesh)
        loader = data._build_loader(rank, replicas)  # what the trainer's strategy asks for
    optimizer = build_optimizer(model, run.optim)
    scheduler = build_scheduler(optimizer, run.optim, run.trainer.max_steps)
    batches = endless(loader)
    model.train()
    losses: list[torch.Tensor] = []
    ends: list[tuple[float, float]] = []
    first_batch = time.perf_counter()
    for _ in range(run.trainer.max_steps):
        inputs, targets, *documents = next(batches)
        loss = F.cross_entropy(model(inputs, *documents).flatten(0, 1).float(),
                               targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(model.parameters(), run.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())  # no .item(): a hand loop that syncs would flatter the ratio
        ends.append(mark())
    window = torch.stack(losses[-last_window(run):]).mean()
    if run.world_size > 1:  # the step monitor reports the mean over ranks: so does this
        torch.distributed.all_reduce(window, op=torch.distributed.ReduceOp.AVG)
    return Timing(startup_s=first_batch - start, ends=ends,
                  end_s=time.perf_counter() - ends[-2][0], loss=window.item())


# ------------------------------------------------------------------------------------------------
# Several ranks: each side is one torchrun job of this script in --worker mode


def run_worker(side: str, out: Path, steps: int, ranks: int, run_dir: Path,
               extra: list[str]) -> None:
    """One rank of one side under torchrun; rank 0 writes its Timing to `out` as JSON."""
    import torch.distributed as dist

    run, resolved = bench_config(steps, run_dir.parent / "mlflow.db", extra, ranks)
    if side == "ultramesh":
        timing = run_ultramesh(run, resolved, run_dir)
    else:
        dist.init_process_group("gloo")
        timing = run_hand_loop(run)
    if int(os.environ["RANK"]) == 0:
        out.write_text(json.dumps(timing.__dict__))
    # Leave without the interpreter's teardown, where gloo's threads can abort a finished process
    # (trainer/train.py says why); every result is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_torchrun(side: str, steps: int, ranks: int, workdir: Path, name: str,
                 extra: list[str]) -> Timing:
    out = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", __file__, "--worker", side, "--out", str(out),
           "--steps", str(steps), "--ranks", str(ranks), "--run-dir", str(workdir / name),
           *extra]
    with open(workdir / f"{name}.log", "wb") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{(workdir / f'{name}.log').read_text()[-4000:]}")
    fields = json.loads(out.read_text())
    return Timing(**{**fields, "ends": [tuple(e) for e in fields["ends"]]})


@dataclass
class Rounds:
    """Both sides' timings, round by round; round 0 is the warm-up."""

    ultramesh: list[Timing]
    hand: list[Timing]

    def timed(self) -> Rounds:
        return Rounds(self.ultramesh[1:], self.hand[1:])


def run_rounds(steps: int, repeats: int, workdir: Path, extra: list[str],
               ranks: int = 1) -> Rounds:
    run, resolved = bench_config(steps, workdir / "mlflow.db", extra, ranks)
    rounds = Rounds([], [])
    for r in range(repeats + 1):  # round 0 warms both up: lazy imports, allocator, MLflow schema
        if ranks == 1:
            sides = [lambda r=r: run_ultramesh(run, resolved, workdir / f"run-{r}"),
                     lambda: run_hand_loop(run)]
        else:
            sides = [lambda r=r: run_torchrun("ultramesh", steps, ranks, workdir, f"run-{r}",
                                              extra),
                     lambda r=r: run_torchrun("hand", steps, ranks, workdir, f"hand-{r}", extra)]
        if r % 2:
            sides.reverse()
        results = [side() for side in sides]
        ultramesh, hand = results if r % 2 == 0 else results[::-1]
        rounds.ultramesh.append(ultramesh)
        rounds.hand.append(hand)
        print(f"  round {r}{' (warm-up)' if not r else ''}: ultramesh "
              f"{ultramesh.mean_step_s * 1e3:.1f} ms/step, hand {hand.mean_step_s * 1e3:.1f} "
              f"ms/step, ratio {ultramesh.mean_step_s / hand.mean_step_s:.3f} "
              f"(CPU {ultramesh.cpu_step_s / hand.cpu_step_s:.3f})", flush=True)
    return rounds


def pooled_steps_s(timings: list[Timing]) -> list[float]:
    return [s for t in timings for s in t.steps_s]


def lower_quartile(values: list[float]) -> float:
    """The step time that a quarter of the steps beat: the steps that other jobs on the machine
    disturbed least, so the closest to what the step itself costs."""
    return statistics.quantiles(values, n=4)[0]


def median_of(timings: list[Timing], figure: Callable[[Timing], float]) -> float:
    return statistics.median(figure(t) for t in timings)


def report(rounds: Rounds, steps: int, ranks: int = 1) -> None:
    u, h = rounds.timed().ultramesh, rounds.timed().hand
    rows = [  # (label, ultramesh, hand loop, unit scale); the ratio is ultramesh / hand loop
        ("median step, all steps (ms)", statistics.median(pooled_steps_s(u)),
         statistics.median(pooled_steps_s(h)), 1e3),
        ("lower-quartile step, all steps (ms)", lower_quartile(pooled_steps_s(u)),
         lower_quartile(pooled_steps_s(h)), 1e3),
        ("mean step, median of rounds (ms)", median_of(u, lambda t: t.mean_step_s),
         median_of(h, lambda t: t.mean_step_s), 1e3),
        ("CPU per step, median of rounds (ms)", median_of(u, lambda t: t.cpu_step_s),
         median_of(h, lambda t: t.cpu_step_s), 1e3),
    ]
    threads = 1 if ranks > 1 else torch.get_num_threads()
    print(f"\nsteps 2..{steps - 1} of {steps}, {len(u)} rounds, {ranks} rank(s), {threads} "
          f"thread(s) per rank")
    print(f"{'':36} {'ultramesh':>10} {'hand loop':>10} {'ratio':>7}")
    for label, ours, theirs, scale in rows:
        print(f"{label:36} {ours * scale:>10.2f} {theirs * scale:>10.2f} {ours / theirs:>7.3f}")
    print(f"{'start-up, first run in process (s)':36} {rounds.ultramesh[0].startup_s:>10.2f} "
          f"{rounds.hand[0].startup_s:>10.2f}")
    for label, figure in (("start-up, later runs (s)", lambda t: t.startup_s),
                          ("last step + closing down (s)", lambda t: t.end_s)):
        print(f"{label:36} {median_of(u, figure):>10.2f} {median_of(h, figure):>10.2f}")
    per_round = [a.mean_step_s / b.mean_step_s for a, b in zip(u, h, strict=True)]
    print(f"per-round ratio of mean steps: min {min(per_round):.3f}, median "
          f"{statistics.median(per_round):.3f}, max {max(per_round):.3f}  (target <= "
          f"{TARGET_RATIO.get(ranks, TARGET_RATIO[4])} for the ratio of median steps)")
    print(f"final loss (last window{', mean over ranks' if ranks > 1 else ''}): ultramesh "
          f"{u[-1].loss:.6f}, hand loop {h[-1].loss:.6f}")
    if abs(u[-1].loss - h[-1].loss) > 1e-4 * abs(h[-1].loss):
        print("WARNING: the two sides trained differently, so the ratio compares different work")


@dataclass
class ChildRun:
    seconds: float
    peak_rss_mib: float
    exit_code: int


# Linux carries a process's peak-RSS mark across fork and exec, so a child started straight from
# this (large) process would report at least this process's size. A small Python process in
# between starts the command and reports the peak of its one child.
_PEAK_RSS_OF_CHILD = """
import resource, subprocess, sys
with open(sys.argv[1], "wb") as out:
    code = subprocess.call(sys.argv[2:], stdout=out, stderr=subprocess.STDOUT)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


def run_child(argv: list[str], cwd: Path, log_name: str) -> ChildRun:
    """Run a command to its end in `cwd` (its output in `log_name` there): wall time, peak RSS."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.perf_counter()
    reply = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_CHILD, str(cwd / log_name), *argv],
                           cwd=cwd, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    max_rss_kib, exit_code = (int(word) for word in reply.stdout.split())
    return ChildRun(seconds, max_rss_kib / 1024, exit_code)  # Linux: ru_maxrss is in KiB


def report_imports(workdir: Path) -> None:
    """A fresh interpreter's cost to import what each side needs."""
    torch_only = run_child([sys.executable, "-c", "import torch"], workdir, "import-torch.log")
    ours = run_child([sys.executable, "-c", "import trainer.fit, mlflow"], workdir,
                     "import-trainer.log")
    print(f"imports in a fresh process: torch {torch_only.seconds:.1f} s "
          f"({torch_only.peak_rss_mib:.0f} MiB); trainer.fit + mlflow {ours.seconds:.1f} s "
          f"({ours.peak_rss_mib:.0f} MiB)")


def report_default_run(workdir: Path) -> None:
    """`python -m trainer` as a user first runs it: 200 steps, checkpoints, ./mlflow.db."""
    where = workdir / "default-run"
    where.mkdir()
    print("default run: python -m trainer (no arguments) ...", flush=True)
    child = run_child([sys.executable, "-m", "trainer"], where, "train.out")
    status = "ok" if child.exit_code == 0 else f"FAILED, exit {child.exit_code}; see its output"
    print(f"default run: {child.seconds:.0f} s, peak RSS {child.peak_rss_mib:.0f} MiB ({status})")
    if child.exit_code:
        print((where / "train.out").read_text()[-3000:], file=sys.stderr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1, choices=(1, 4),
                        help="processes per side: 1 (in this process) or 4 (torchrun, fsdp x tp)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (at least 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for both sides (default: torch's own choice)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides for both sides, e.g. model.dim=512 (the hand loop "
                             "builds the reference model)")
    parser.add_argument("--default-run", action="store_true",
                        help="also run `python -m trainer` and print its peak RSS (minutes)")
    # --worker: one rank of one side, started by this script through torchrun
    parser.add_argument("--worker", choices=("ultramesh", "hand"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 4 or args.repeats < 1:
        parser.error("--steps must be at least 4 and --repeats at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        logging.basicConfig(filename=args.run_dir.parent / f"{args.run_dir.name}-rank"
                            f"{os.environ['RANK']}.log", level=logging.INFO)
        run_worker(args.worker, args.out, args.steps, args.ranks, args.run_dir, args.overrides)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    # What `python -m trainer` does with log records: INFO and up to a file in the run directory.
    with tempfile.TemporaryDirectory(prefix="ultramesh-bench-") as tmp:
        workdir = Path(tmp)
        logging.basicConfig(filename=workdir / "train.log", level=logging.INFO)
        # On a terminal the ultramesh side draws a Rich progress bar; elsewhere it logs lines.
        progress = "progress bar" if sys.stderr.isatty() else "progress log lines"
        where = (f"{torch.get_num_threads()} threads" if args.ranks == 1 else
                 f"{args.ranks} torchrun ranks x 1 thread, {' '.join(SHARDED)}")
        print(f"overhead: {args.steps} steps x {args.repeats} rounds, ultramesh fit() vs a "
              f"hand-written loop, {where}, {progress}, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        rounds = run_rounds(args.steps, args.repeats, workdir, args.overrides, args.ranks)
        report(rounds, args.steps, args.ranks)
        print(f"peak RSS of this process: "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        report_imports(workdir)
        if args.default_run:
            report_default_run(workdir)


if __name__ == "__main__":
    main()
