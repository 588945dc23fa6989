"""What MLflow tracking adds to a training step: the same run with tracking to a real local
`mlflow server` against tracking off, alternately in one process.

Both sides are the real path, `trainer.fit.fit()`, with the default (tiny) model, metrics emitted
every step (`trainer.log_every_n_steps=1`: the most tracking ever has to carry) and periodic
checkpoints off. Steps are timed from inside as in `bench/overhead.py` (whose clock this reuses):
steps 2..N-1 of each run, so opening and closing the run are reported apart. The server starts
once (about 25 s). The machine is shared, so the figure to read is the ratio from this one run.

    python bench/tracking.py [--steps 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf
from overhead import Timing, pooled_median_ms, run_ultramesh

from trainer.config import RunConfig, compose, validate

TARGET_RATIO = 1.01  # issue 4: tracking may add at most 1% to a step


@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` on loopback (SQLite store, artifacts served by it); yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(
            [exe, "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no mlflow server; see {root / 'server.log'}") from exc
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def config(steps: int, tracking: list[str]) -> tuple[RunConfig, dict]:
    overrides = [f"trainer.max_steps={steps}", f"optim.warmup_steps={steps // 3}",
                 "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
                 "checkpoint.every_n_steps=0", *tracking]
    cfg = compose(overrides)
    return validate(cfg), OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def run_rounds(steps: int, repeats: int, server: str, workdir: Path) -> dict[str, list[Timing]]:
    sides = {"tracking on": config(steps, [f"tracking.uri={server}", "tracking.experiment=bench"]),
             "tracking off": config(steps, ["tracking=none"])}
    timings: dict[str, list[Timing]] = {name: [] for name in sides}
    for r in range(repeats + 1):  # round 0 warms up: lazy imports, the allocator, the experiment
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            run, resolved = sides[name]
            timing = run_ultramesh(run, resolved, workdir / f"{name.replace(' ', '-')}-{r}")
            if r:
                timings[name].append(timing)
        on, off = (timings[n][-1].mean_step_s if r else 0.0 for n in sides)
        if r:
            print(f"  round {r}: on {on * 1e3:.2f} ms/step, off {off * 1e3:.2f} ms/step, "
                  f"ratio {on / off:.3f}", flush=True)
    return timings


def report(timings: dict[str, list[Timing]], steps: int) -> None:
    on, off = timings["tracking on"], timings["tracking off"]
    on_med, off_med = pooled_median_ms(on), pooled_median_ms(off)
    on_mean = statistics.median(t.mean_step_s for t in on) * 1e3
    off_mean = statistics.median(t.mean_step_s for t in off) * 1e3
    per_round = [a.mean_step_s / b.mean_step_s for a, b in zip(on, off, strict=True)]
    print(f"\nsteps 2..{steps - 1} of {steps}, {len(on)} rounds, metrics sent every step")
    print(f"{'':34} {'on':>9} {'off':>9} {'ratio':>7}")
    print(f"{'median step ms (all steps)':34} {on_med:>9.2f} {off_med:>9.2f} "
          f"{on_med / off_med:>7.3f}")
    print(f"{'mean step ms (median of rounds)':34} {on_mean:>9.2f} {off_mean:>9.2f} "
          f"{on_mean / off_mean:>7.3f}")
    print(f"{'start-up s (median)':34} {statistics.median(t.startup_s for t in on):>9.2f} "
          f"{statistics.median(t.startup_s for t in off):>9.2f}")
    print(f"{'last step + end s (median)':34} {statistics.median(t.end_s for t in on):>9.2f} "
          f"{statistics.median(t.end_s for t in off):>9.2f}")
    print(f"per-round ratio of mean steps: min {min(per_round):.3f}, median "
          f"{statistics.median(per_round):.3f}, max {max(per_round):.3f}  "
          f"(target < {TARGET_RATIO})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per run (at least 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp, \
            mlflow_server(Path(tmp)) as server:
        print(f"mlflow server at {server}", flush=True)
        report(run_rounds(args.steps, args.repeats, server, Path(tmp)), args.steps)


if __name__ == "__main__":
    main()
