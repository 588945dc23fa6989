"""The XLA path through `python -m trainer strategy=xla` on XLA's CPU device (PJRT_DEVICE=CPU).

Runs in the XLA environment (`make test-xla`: torch 2.9 + torch-xla 2.9) and, for the CPU path's
half of each comparison, in the default environment (torch 2.13, no torch_xla), whose python is
ULTRAMESH_CPU_PYTHON (default: .venv/bin/python of the checkout). Neuron itself is not here: what
these runs cannot show is listed in docs/hardware/trainium-xla.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require
from tests.dcp_weights import weights

pytestmark = pytest.mark.xla

REPO = Path(__file__).resolve().parents[2]
CPU_PYTHON = Path(os.environ.get("ULTRAMESH_CPU_PYTHON", REPO / ".venv" / "bin" / "python"))
# A small decoder and short sequences: the XLA run compiles its graphs once (about 25 of them:
# the step, the first step without optimizer state, the weights' initialisation, the copies a
# checkpoint makes) and then runs them.
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=128", "data.seq_len=64", "data.micro_batch_size=4",
         "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "optim.warmup_steps=2",
         "checkpoint.every_n_steps=4", "checkpoint.async_save=false"]
STEPS = 8
@dataclass
class Run:
    cwd: Path
    log: str

    def checkpoint(self, step: int) -> str:
        return str(self.cwd / "out" / "checkpoints" / f"step-{step:08d}.ckpt")

    def losses(self) -> dict[int, float]:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{self.cwd / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 1
        history = client.get_metric_history(runs[0].info.run_id, "train/loss")
        return {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}


def trainer(python: str | Path, cwd: Path, *overrides: str) -> Run:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "PJRT_DEVICE": "CPU",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([str(python), "-m", "trainer", *SMALL, "hydra.run.dir=out",
                           *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Run(cwd, proc.stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The same 8-step run on XLA (this environment) and on the CPU path (the default one)."""
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        require("torch_xla", "the XLA tests run in the XLA environment: make test-xla")
    if not CPU_PYTHON.exists():
        require(f"the default environment's python ({CPU_PYTHON})",
                "make dev, or set ULTRAMESH_CPU_PYTHON")
    root = tmp_path_factory.mktemp("xla-runs")
    return {"xla": trainer(sys.executable, root / "xla", "strategy=xla",
                           f"trainer.max_steps={STEPS}"),
            "cpu": trainer(CPU_PYTHON, root / "cpu", f"trainer.max_steps={STEPS}")}


def test_a_run_on_xla_trains_and_matches_the_cpu_path_step_for_step(runs):
    xla, cpu = runs["xla"].losses(), runs["cpu"].losses()
    assert sorted(xla) == list(range(1, STEPS + 1))
    assert xla[STEPS] < xla[1] - 0.5  # it learns (the first loss is about ln(256) = 5.5)
    # the same initial weights (drawn from the seed on the host) and batches: only the kernels
    # differ, XLA's CPU backend against ATen's
    for step, loss in cpu.items():
        assert xla[step] == pytest.approx(loss, rel=1e-3), step
    assert "XLA compiled" in runs["xla"].log and "XLA compiled" not in runs["cpu"].log


@pytest.mark.parametrize(("saved_on", "loaded_on"), [("xla", "cpu"), ("cpu", "xla")])
def test_a_checkpoint_resumes_on_the_other_path_and_the_run_goes_on_as_before(
        runs, tmp_path: Path, saved_on: str, loaded_on: str):
    """Saved at step 4 on one path, resumed on the other to step 8: the weights, optimizer state
    and data position it loaded make steps 5-8 what the saving run made them. (A resumed run
    saves only after a step, so the loaded weights are compared after four: XLA's and ATen's
    kernels differ by about 1e-6 relative there; a weight or AdamW moment lost in the load moves
    an update by its own size, 1e-2 to 1e-1 of the weights.)"""
    source = runs[saved_on]
    python = {"xla": sys.executable, "cpu": CPU_PYTHON}[loaded_on]
    extra = ["strategy=xla"] if loaded_on == "xla" else []
    resumed = trainer(python, tmp_path, *extra, f"trainer.max_steps={STEPS}",
                      f"checkpoint.resume={source.checkpoint(4)}")
    assert f"resumed from {source.checkpoint(4)} (step 4)" in resumed.log
    ours, theirs = weights(resumed.checkpoint(STEPS)), weights(source.checkpoint(STEPS))
    assert ours.keys() == theirs.keys() and len(theirs) > 10
    for key, expected in theirs.items():
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        assert (ours[key] - expected).norm() <= 1e-4 * expected.norm(), key
    losses, before = resumed.losses(), source.losses()
    assert sorted(losses) == list(range(5, STEPS + 1))  # it went on from step 5, in one run
    for step, loss in losses.items():
        assert loss == pytest.approx(before[step], rel=1e-3), step


def test_two_xla_processes_on_cpu_are_refused_in_one_line(tmp_path: Path):
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        require("torch_xla", "the XLA tests run in the XLA environment: make test-xla")
    proc = subprocess.run([sys.executable, "-m", "trainer", "strategy=xla", "trainer.devices=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: trainer.devices=2"), lines
    assert "distributed runtime" in lines[0]
    assert list(tmp_path.iterdir()) == []
