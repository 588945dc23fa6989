"""The MoE family end to end, as a user runs it: `python -m trainer experiment=moe_tiny_cpu` on
four gloo processes with expert parallel, MLflow's store on disk, DCP checkpoints resumed across
expert-parallel degrees and after a SIGKILL. What a run did is read from its real outputs:
metrics from MLflow, weights from its checkpoints with torch's own DCP reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.dcp_weights import assert_close, weights

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# global batch 8 sequences of 32 tokens whatever the number of ranks
COMMON = ["experiment=moe_tiny_cpu", "data.seq_len=32", "trainer.log_every_n_steps=1",
          "trainer.progress_bar=true", "optim.warmup_steps=1", "checkpoint.io_threads=2",
          "checkpoint.async_save=false", "checkpoint.keep_last=10"]
FOUR = ["trainer.devices=4", "data.micro_batch_size=2"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(name: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer", *COMMON, *overrides, f"hydra.run.dir={name}",
            f"tracking.run_name={name}"]


def train(cwd: Path, name: str, overrides: list[str]) -> str:
    proc = subprocess.run(command(name, overrides), cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (cwd / f"{name}.log").write_text(log)
    assert proc.returncode == 0, log[-5000:]
    return log


def history(cwd: Path, run_name: str, metric: str) -> dict[int, float]:
    """{step: value} of `metric` in the one MLflow run called `run_name` (the newest value
    where a step was logged twice)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`mlflow.runName` = '{run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    points = sorted(client.get_metric_history(runs[0].info.run_id, metric),
                    key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in points}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


@pytest.fixture(scope="module")
def straight(workdir) -> str:
    """The recipe's own mesh: dp_shard=4 with ep=2, checkpoints every 2 steps, MLflow on."""
    return train(workdir, "straight", [*FOUR, f"trainer.max_steps={STEPS}",
                                       "checkpoint.every_n_steps=2"])


def test_the_tiny_moe_trains_with_expert_parallel_and_router_health_in_mlflow(straight, workdir):
    assert "ep=2 (of dp_shard)" in straight
    losses = history(workdir, "straight", "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    # byte-level text starts near ln(256) = 5.5 nats; six steps at lr 3e-3 bring it well down
    assert losses[STEPS] < 0.8 * losses[1]
    for layer in ("1", "2", "3"):  # layer 0 is dense (model.n_dense_layers=1)
        load = history(workdir, "straight", f"router/layer{layer}/load_max_over_mean")
        assert sorted(load) == list(range(1, STEPS + 1))
        assert all(1.0 <= v <= 8.0 for v in load.values())  # max over mean of 8 experts
    aux = history(workdir, "straight", "router/aux_loss")
    # 0.001 x E x sum f_e P_e: 0.001 x 3 layers' mean near 1 when balanced
    assert all(0.0005 < v < 0.01 for v in aux.values())
    assert history(workdir, "straight", "router/layer1/bias_spread")[STEPS] == 0.0  # rate 0


def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(straight, workdir):
    overrides = [*FOUR, f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=2",
                 "checkpoint.resume=last"]
    with subprocess.Popen(command("killed", overrides), cwd=workdir, env=ENV,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "checkpoint step 4:" in line:
                os.killpg(proc.pid, signal.SIGKILL)  # every rank, no handler runs
                break
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    log = train(workdir, "killed", overrides)
    assert "step-00000004.ckpt" in log
    assert history(workdir, "killed", "train/loss") == history(workdir, "straight", "train/loss")
    assert_close(weights(str(workdir / "killed/checkpoints/step-00000006.ckpt")),
                 weights(str(workdir / "straight/checkpoints/step-00000006.ckpt")))


def test_checkpoints_resume_across_expert_parallel_degrees_4_2_1(workdir):
    """ep=4 over 4 ranks writes steps 1-4; ep=2 over 2 ranks resumes its step 2 and trains 3-4;
    one process (ep=1) resumes the 2-rank step 3 and trains step 4. Each matches the 4-rank run
    (every run has max_steps=4: the schedule depends on it)."""
    every = ["checkpoint.every_n_steps=1", "trainer.max_steps=4", "tracking=none"]
    four = workdir / "ep4"
    a = train(workdir, "ep4", [*FOUR, "parallelism.ep=4", *every])
    b = train(workdir, "ep2", ["trainer.devices=2", "data.micro_batch_size=4", "parallelism.ep=2",
                               *every, f"checkpoint.resume={four}/checkpoints/step-00000002.ckpt"])
    c = train(workdir, "ep1", ["trainer.devices=1", "data.micro_batch_size=8", "parallelism.ep=1",
                               *every,
                               f"checkpoint.resume={workdir}/ep2/checkpoints/step-00000003.ckpt"])
    assert "ep=4 (of dp_shard)" in a and "ep=2 (of dp_shard)" in b
    steps = {name: _losses(log) for name, log in (("a", a), ("b", b), ("c", c))}
    assert sorted(steps["b"]) == [3, 4] and sorted(steps["c"]) == [4]
    for step in (3, 4):
        assert steps["b"][step] == pytest.approx(steps["a"][step], abs=2e-4)
    assert steps["c"][4] == pytest.approx(steps["a"][4], abs=2e-4)
    final = weights(f"{four}/checkpoints/step-00000004.ckpt")
    assert any(".experts.w1" in key for key in final)
    assert_close(weights(f"{workdir}/ep2/checkpoints/step-00000004.ckpt"), final)
    assert_close(weights(f"{workdir}/ep1/checkpoints/step-00000004.ckpt"), final)


def _losses(log: str) -> dict[int, float]:
    import re

    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+\s+loss ([0-9.]+)", log)}
