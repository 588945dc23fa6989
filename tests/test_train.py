"""`python -m trainer` end to end, as a user runs it: real processes, real MLflow store on disk."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import require
from mlflow.tracking import MlflowClient

# Small enough to train in seconds on 2 cores, big enough for the loss to move.
FAST = ["data.seq_len=64", "data.micro_batch_size=4", "trainer.log_every_n_steps=1",
        "optim.warmup_steps=2", "optim.lr=3e-3"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def train(cwd: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trainer", *FAST, *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(cwd: Path, run_name: str) -> list[float]:
    """The `train/loss` of each step of the one run called `run_name` in cwd's MLflow store (the
    newest value where a step was logged twice)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`mlflow.runName` = '{run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"),
                     key=lambda m: (m.step, m.timestamp))
    return list({m.step: m.value for m in history}.values())


def test_default_run_trains_and_says_where_its_outputs_are(tmp_path: Path):
    proc = train(tmp_path, "trainer.max_steps=12", "tracking.run_name=default")
    log = proc.stderr
    checkpoints = list(tmp_path.glob("outputs/*/*/checkpoints/step-00000012.ckpt"))
    assert len(checkpoints) == 1
    assert str(checkpoints[0]) in log
    assert "mlflow ui" in log and "mlflow.db" in log
    history = losses(tmp_path, "default")
    assert len(history) == 12
    assert history[-1] < history[0]


def test_two_processes_train_and_the_loss_falls(tmp_path: Path):
    train(tmp_path, "trainer.devices=2", "parallelism=ddp", "trainer.max_steps=30",
          "tracking.run_name=ddp")
    history = losses(tmp_path, "ddp")
    assert len(history) == 30
    # Byte-level text starts near ln(256) = 5.5 nats; 30 steps bring it well down.
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5


GLOO_EXIT = """
import atexit, pathlib, sys, time, torch.distributed as dist
from trainer.train import _GLOO_THREADS, _exit_before_gloo_teardown
if sys.argv[1] == "gloo":
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    mesh_holds = dist.distributed_c10d._get_default_group()  # as a run's meshes hold theirs
    dist.destroy_process_group()
    # a thread names itself once it runs: on a busy machine, give it the time a run's steps do
    tasks = pathlib.Path("/proc/self/task")
    deadline = time.monotonic() + 10
    while (time.monotonic() < deadline and not _GLOO_THREADS
           & {(t / "comm").read_text().strip() for t in tasks.iterdir()}):
        time.sleep(0.05)
atexit.register(lambda: print("interpreter teardown ran"))
_exit_before_gloo_teardown(0)
print("returned")
"""


@pytest.mark.parametrize("backend", ["gloo", "none"])
def test_a_finished_gloo_run_exits_0_before_the_interpreter_tears_down(backend: str):
    # gloo's threads outlive destroy_process_group; if torch renames them, the check silently
    # stops working: this fails instead.
    proc = subprocess.run([sys.executable, "-c", GLOO_EXIT, backend], capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [] if backend == "gloo" else ["returned", "interpreter teardown ran"]
    assert proc.stdout.splitlines() == expected


def test_same_seed_same_losses_other_seed_other_losses(tmp_path: Path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        train(tmp_path, "trainer.max_steps=6", f"seed={seed}", f"tracking.run_name={name}")
    a, b, c = (losses(tmp_path, n) for n in "abc")
    assert a == b
    assert a != c


def test_a_killed_run_resumes_exactly_where_it_stopped(tmp_path: Path):
    common = [*FAST, "trainer.max_steps=10", "checkpoint.every_n_steps=5"]
    train(tmp_path, *common[len(FAST):], "tracking.run_name=straight", "hydra.run.dir=straight")

    # The same job, killed without warning once its step-5 checkpoint is committed ...
    job = [sys.executable, "-m", "trainer", *common, "tracking.run_name=resumed",
           "hydra.run.dir=resumed"]
    with subprocess.Popen(job, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=ENV) as proc:
        for line in proc.stderr:
            if "checkpoint step 5:" in line:
                proc.kill()
                break
    assert proc.returncode == -9
    # ... then started again, asked to resume from its newest checkpoint.
    train(tmp_path, *common[len(FAST):], "tracking.run_name=resumed", "hydra.run.dir=resumed",
          "checkpoint.resume=last")

    straight = losses(tmp_path, "straight")
    assert len(straight) == 10
    # One MLflow run across the kill; steps logged twice (after the checkpoint, before the kill)
    # were recomputed after the resume and must agree.
    assert losses(tmp_path, "resumed") == straight


def test_a_users_own_lightning_module_trains_through_target(tmp_path: Path):
    (tmp_path / "my_module.py").write_text(USER_MODULE)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "model._target_=my_module.Bigram",
         "+model.kwargs.vocab=256", "trainer.max_steps=8", "tracking=none", *FAST],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**ENV, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bigram trained" in proc.stdout


USER_MODULE = '''
import torch
import pytorch_lightning as pl


class Bigram(pl.LightningModule):
    """Knows nothing of ultramesh: it gets its batches and its trainer from the config."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        logits = self.table(inputs)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def on_train_end(self):
        print("bigram trained", self.trainer.global_step)
'''


# --- refusals before anything starts, and nothing left behind ----------------------------------

SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
         "model.ffn_dim=64", "data.seq_len=32", "data.micro_batch_size=2", "tracking=none",
         "checkpoint.every_n_steps=0", "trainer.progress_bar=false"]


def refused(cwd: Path, *args: str) -> str:
    """The one line `python -m trainer <args>` exits 2 with, after checking it left no file."""
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert list(cwd.iterdir()) == [], "a refused run left files behind"
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("config error: ")
    return lines[-1]


UNDRIVABLE = [
    pytest.param(["hardware=h100"], ["hardware='h100'", "CUDA", "python -m trainer.plan"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
                 id="h100-without-gpu"),
    pytest.param(["hardware=trn2"], ["hardware='trn2'", "pip install", "torch-neuronx"],
                 marks=pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None,
                                          reason="torch-neuronx is installed"),
                 id="trn2-without-torch-neuronx"),
    pytest.param(["hardware=trn1"], ["strategy.name='auto'", "hardware=trn1", "torch_xla"],
                 marks=pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None,
                                          reason="torch_xla is installed"),
                 id="trn1-without-torch-xla"),
    pytest.param(["hardware=trn2", "trainer.precision=fp8"],
                 ["trainer.precision='fp8'", "trn2 does not train in fp8", "bf16"],
                 id="fp8-on-trn2"),
    pytest.param(["experiment=tiny_cpu_4wya"], ["experiment/tiny_cpu_4wya", "tiny_cpu_4way"],
                 id="experiment-typo"),
    pytest.param(["hardware=h100", "cluster.nodes=2"], ["cluster.nodes=2", "python -m launch"],
                 id="several-nodes"),
    pytest.param(["data=shards", "data.path=/nonexistent/x"], ["/nonexistent/x", "index.json"],
                 id="missing-dataset"),
]


@pytest.mark.parametrize(("overrides", "words"), UNDRIVABLE)
def test_preflight_refuses_in_one_line_and_leaves_nothing(tmp_path: Path, overrides, words):
    proc = subprocess.run([sys.executable, "-m", "trainer", *overrides], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("multirun", [[], ["--multirun", "seed=1,2"]], ids=["run", "multirun"])
def test_an_error_only_the_job_finds_leaves_nothing_behind(tmp_path: Path, multirun):
    # --config-dir: a config tree of the user's own, which preflight leaves to the job to check
    extra = tmp_path.parent / f"{tmp_path.name}-configs"
    extra.mkdir()
    line = refused(tmp_path, "--config-dir", str(extra), *multirun, "data=shards",
                   "data.path=/nonexistent/x")
    assert "/nonexistent/x" in line


def test_a_short_run_gets_a_short_warmup(tmp_path: Path):
    # the default warmup must not refuse a run shorter than it
    proc = subprocess.run([sys.executable, "-m", "trainer", *SMALL, "trainer.max_steps=5",
                           "trainer.log_every_n_steps=1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final loss" in proc.stderr


# --- Hydra's sweeper plugins ---------------------------------------------------------------------


def need_optuna_sweeper() -> None:
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        require("hydra-optuna-sweeper", "pip install hydra-optuna-sweeper (in the dev extra)")


def test_the_optuna_sweeper_runs_two_trials(tmp_path: Path):
    need_optuna_sweeper()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--multirun", "hydra/sweeper=optuna",
         "optim.lr=interval(1e-4,1e-2)", "hydra.sweeper.n_trials=2", *SMALL,
         "trainer.max_steps=3", "trainer.log_every_n_steps=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(tmp_path.glob("multirun/*/*/optimization_results.yaml"))
    assert len(results) == 1
    best = yaml.safe_load(results[0].read_text())
    assert 1e-4 <= best["best_params"]["optim.lr"] <= 1e-2
    # the objective is the trainer's own final loss: byte-level text starts near ln(256) = 5.5
    assert 0 < best["best_value"] < 10
    assert sorted(p.name for p in results[0].parent.iterdir() if p.is_dir()) == ["0", "1"]


def test_a_plugin_search_space_outside_what_validation_allows_is_refused(tmp_path: Path):
    need_optuna_sweeper()
    line = refused(tmp_path, "--multirun", "hydra/sweeper=optuna",
                   "optim.lr=interval(-1.0,-0.5)", "hydra.sweeper.n_trials=2")
    assert "optim.lr" in line
