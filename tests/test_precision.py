"""trainer.precision=fp8 / mxfp8 end to end on CPU, in torchao's emulation, as a user runs them:
`python -m trainer` processes (Lightning's launcher for two ranks), read from their logs, MLflow
store and checkpoints, and `python -m trainer.checkpoint export`.

Tolerances: fp8 rounds every matmul operand to 3 (e4m3) or 2 (e5m2) mantissa bits, so an fp8 loss
curve is not bf16's; published fp8 pretraining curves stay within about 1% of bf16's (torchao's
float8 README; Micikevicius et al. 2022, "FP8 Formats for Deep Learning"). A 2-layer model over
200 steps is noisier: each logged loss from step 50 on is held within 3% of bf16's at that step
(measured here: at most 1.2%).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from tests.dcp_weights import assert_close, weights

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=128", "data.seq_len=32", "optim.lr=3e-3", "trainer.progress_bar=true"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LOSS_LINE = re.compile(r"step (\d+)/\d+\s+loss ([0-9.]+)")
TOLERANCE = 0.03


def trainer(cwd: Path, *args: str, name: str = "run") -> str:
    flags = [a for a in args if a.startswith("--")]  # Hydra's come before the overrides
    overrides = [a for a in args if not a.startswith("--")]
    proc = subprocess.run([sys.executable, "-m", "trainer", *flags, *MICRO, *overrides], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (cwd / f"{name}.log").write_text(log)
    assert proc.returncode == 0, log[-5000:]
    return log


def losses(log: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in LOSS_LINE.findall(log)}


# ------------------------------------------------------------------------------------------------
# Loss curves: fp8 and mxfp8 against bf16-mixed, one sweep


def test_emulated_fp8_and_mxfp8_train_within_tolerance_of_bf16(tmp_path: Path):
    log = trainer(tmp_path, "--multirun", "trainer.precision=bf16-mixed,fp8,mxfp8",
                  "trainer.max_steps=200", "trainer.log_every_n_steps=10",
                  "data.micro_batch_size=8", "checkpoint.every_n_steps=0")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.precision != ''")
    by_precision = {run.data.tags["precision"]: run.info.run_id for run in runs}
    # MLflow says which precision ran, and that torchao emulated it on this CPU
    fp8 = "fp8 (tensorwise; emulated by torchao on cpu, no speed-up)"
    mxfp8 = "mxfp8 (rceil; emulated by torchao on cpu, no speed-up)"
    assert set(by_precision) == {"bf16-mixed", fp8, mxfp8}
    curves = {}
    for precision, run_id in by_precision.items():
        history = client.get_metric_history(run_id, "train/loss")
        curves[precision] = {m.step: m.value for m in history}
    bf16 = curves["bf16-mixed"]
    steps = sorted(bf16)
    assert len(steps) >= 20 and steps[-1] >= 190
    for precision in (fp8, mxfp8):
        curve = curves[precision]
        assert sorted(curve) == steps
        assert curve[steps[-1]] < 0.6 * curve[steps[0]], precision  # it trains
        for step in (s for s in steps if s >= 50):
            assert abs(curve[step] - bf16[step]) <= TOLERANCE * bf16[step], (precision, step)
        # and it is not bf16 under another name: the rounding shows in the losses
        assert any(curve[s] != bf16[s] for s in steps), precision
    # the progress line says so too
    assert re.search(r"step 200/200 .*fp8 emulated", log)
    assert re.search(r"step 200/200 .*mxfp8 emulated", log)


# ------------------------------------------------------------------------------------------------
# FSDP with float8 all-gather against one process; checkpoints resumed in bf16 and exported
#
# Every sample of this dataset is the same 33 tokens, so a rank's micro-batch holds the same
# values as the one-process batch: tensorwise scaling sees the same amax on every rank as in one
# process, and the runs may differ only in the order of float sums (as bf16 runs of
# tests/test_mesh.py do). With varied samples each rank scales its own activations, and fp8's
# rounding makes the runs drift apart by design.

STEPS = 5
FSDP_RUN = ["trainer.precision=fp8", f"trainer.max_steps={STEPS}", "tracking=none",
            "trainer.log_every_n_steps=1", "optim.warmup_steps=1", "checkpoint.every_n_steps=3"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fp8")
    period = np.random.default_rng(0).integers(0, 256, 32)
    np.save(folder / "periodic.npy", np.tile(period, 400).astype(np.int32))
    proc = subprocess.run([sys.executable, "-m", "trainer.data", "prepare", "--tokenizer", "ids",
                           "--output", str(folder / "periodic"), str(folder / "periodic.npy")],
                          cwd=folder, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return folder


def data(workdir: Path) -> list[str]:
    return ["data=shards", f"data.path={workdir / 'periodic'}"]


@pytest.fixture(scope="module")
def one_process(workdir: Path) -> str:
    return trainer(workdir, *FSDP_RUN, *data(workdir), "data.micro_batch_size=8",
                   f"hydra.run.dir={workdir / 'one'}", name="one")


@pytest.fixture(scope="module")
def two_ranks(workdir: Path) -> str:
    return trainer(workdir, *FSDP_RUN, *data(workdir), "data.micro_batch_size=4",
                   "trainer.devices=2", "parallelism=fsdp", f"hydra.run.dir={workdir / 'two'}",
                   name="two")


def test_fsdp_with_float8_all_gather_matches_one_process(workdir, one_process, two_ranks):
    assert "precision: fp8 (tensorwise, float8 all-gather;" in two_ranks
    assert "float8 all-gather" not in one_process  # one process has nothing to gather
    got, want = losses(two_ranks), losses(one_process)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:  # the log prints 4 decimals
        assert got[step] == pytest.approx(want[step], abs=2e-4), (step, got, want)
    final = f"step-{STEPS:08d}.ckpt"
    assert_close(weights(str(workdir / "two" / "checkpoints" / final)),
                 weights(str(workdir / "one" / "checkpoints" / final)))


def test_an_fp8_checkpoint_resumes_in_bf16_and_exports_as_a_bf16_one(workdir, two_ranks):
    """Step 3 of the two-rank fp8 run, whose weights FSDP gathered in float8, resumed by one
    bf16-mixed process: the checkpoint holds plain weights, no float8 state."""
    saved = workdir / "two" / "checkpoints" / "step-00000003.ckpt"
    log = trainer(workdir, "trainer.precision=bf16-mixed", *FSDP_RUN[1:], *data(workdir),
                  "data.micro_batch_size=8", f"checkpoint.resume={saved}",
                  f"hydra.run.dir={workdir / 'resumed'}", name="resumed")
    assert "resumed from" in log and "(step 3)" in log
    resumed, fp8 = losses(log), losses(two_ranks)
    assert sorted(resumed) == [4, 5]
    for step in resumed:  # bf16 matmuls from step 4 on: close to fp8's, not equal
        assert resumed[step] == pytest.approx(fp8[step], rel=TOLERANCE)
    exported = {name: export(workdir / run / "checkpoints", workdir / f"hf-{name}")
                for name, run in (("fp8", "two"), ("bf16", "resumed"))}
    assert exported["fp8"] == exported["bf16"]
    assert not any("float8" in dtype for dtype in exported["fp8"].values())


def test_an_mxfp8_checkpoint_exports_as_a_bf16_one(workdir):
    """MXFP8's converted weights live in a torchao tensor class; the checkpoint holds them plain."""
    runs = {}
    for precision in ("mxfp8", "bf16-mixed"):
        trainer(workdir, f"trainer.precision={precision}", "trainer.max_steps=2", "tracking=none",
                "data.micro_batch_size=4", f"hydra.run.dir={workdir / precision}",
                name=precision)
        runs[precision] = export(workdir / precision / "checkpoints", workdir / f"hf-{precision}")
    assert runs["mxfp8"] == runs["bf16-mixed"]


def export(checkpoints: Path, to: Path) -> dict[str, str]:
    """`python -m trainer.checkpoint export` of the newest step: {tensor name: dtype} of the
    safetensors it wrote, with config.json's torch_dtype."""
    proc = subprocess.run([sys.executable, "-m", "trainer.checkpoint", "export",
                           str(checkpoints), "--to", str(to)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tensors = {}
    for file in sorted(to.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors |= {name: str(f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118
    assert tensors
    return {**tensors, "config.json": json.loads((to / "config.json").read_text())["torch_dtype"]}
