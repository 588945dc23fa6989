"""Memory that scales with the mesh: each rank's peak host memory (RSS) when the trainer runs a
~300M-parameter decoder on CPU at 1, 2 and 4 ranks, beside the planner's estimate.

Every run is the user's command, `torchrun --nproc_per_node=N -m trainer ...` (one process
without torchrun), and each worker's RSS is sampled from the outside (psutil, every 50 ms) over
the whole run: building the model, two training steps and the final checkpoint. The baseline is
the same, measured in the same session: a one-process run of the tiny model, whose parameters are
negligible, so its peak is what imports, the data loader and the runtime cost.

    python bench/memory.py            # about 3 minutes on 2 idle cores; needs ~8 GiB free

Peak per rank must fall with the mesh as the estimate says: the table gives, per run, peak RSS
minus the baseline against the planner's bytes per rank, and both relative to one rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# ~300M parameters: 16 blocks of dim 1024 (ffn 4096) and a 32k vocabulary.
MODEL = ["model.name=bench_300m", "model.dim=1024", "model.n_layers=16", "model.n_heads=16",
         "model.n_kv_heads=4", "model.ffn_dim=4096", "model.vocab_size=32000",
         "model.max_seq_len=128"]
COMMON = ["hardware=cpu", "tracking=none", "trainer.max_steps=2", "optim.warmup_steps=1",
          "data.seq_len=128", "data.micro_batch_size=1", "trainer.progress_bar=false",
          "checkpoint.every_n_steps=0"]
RUNS = {
    "1 rank": (1, []),
    "dp_shard=2": (2, ["parallelism=fsdp"]),
    "dp_shard=4": (4, ["parallelism=fsdp"]),
    "tp=2 x dp_shard=2": (4, ["parallelism.tp=2", "parallelism.dp_shard=2"]),
}


def peak_rss_per_worker(cmd: list[str], cwd: Path) -> list[int]:
    """Run `cmd`; return the peak RSS of each Python worker it started (torchrun's children, or
    the process itself when there are none)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    parent = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        try:
            for p in [parent, *parent.children(recursive=True)]:
                peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-4000:]}")
    workers = {pid: rss for pid, rss in peaks.items() if pid != proc.pid}
    return sorted((workers or peaks).values(), reverse=True)


def trainer_cmd(nproc: int, overrides: list[str], run_dir: Path) -> list[str]:
    args = ["-m", "trainer", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *args]


def estimate(nproc: int, overrides: list[str]) -> float:
    from trainer.config import load
    from trainer.plan import choose

    return choose(load([*COMMON, *MODEL, f"trainer.devices={nproc}", *overrides])
                  ).estimate.memory_bytes_per_rank


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        baseline = max(peak_rss_per_worker(trainer_cmd(1, [], work / "baseline"), work))
        rows = []
        for name, (nproc, overrides) in RUNS.items():
            full = [*MODEL, f"trainer.devices={nproc}", *overrides]
            slug = "".join(c if c.isalnum() else "_" for c in name)
            peaks = peak_rss_per_worker(trainer_cmd(nproc, full, work / slug),
                                        work)
            rows.append((name, max(peaks), max(peaks) - baseline, estimate(nproc, overrides)))
    one = rows[0]
    print(f"baseline (tiny model, 1 rank): peak RSS {baseline / GIB:.2f} GiB")
    print(f"{'run':<20} {'peak RSS GiB':>12} {'- baseline':>11} {'estimate GiB':>13} "
          f"{'measured/1 rank':>16} {'estimate/1 rank':>16}")
    for name, peak, above, est in rows:
        print(f"{name:<20} {peak / GIB:>12.2f} {above / GIB:>11.2f} {est / GIB:>13.2f} "
              f"{above / one[2]:>16.2f} {est / one[3]:>16.2f}")


if __name__ == "__main__":
    main()
