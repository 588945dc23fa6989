"""MLflow tracking against a real `mlflow server`, driven by the real trainer: `python -m trainer`
in a subprocess where the command line, Hydra or a signal is part of what is tested, and
`trainer.fit.fit` in this process where a subprocess would add nothing but start-up time. One test
renders the run's page in headless Chromium."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml
from conftest import require
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

from trainer import tracking
from trainer.config import compose, validate
from trainer.fit import FitResult, fit

REPO = Path(__file__).resolve().parents[2]
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
STORAGE_SECRET = "fake-storage-secret-8d1f0c"
MESH = {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1}
# Tracking does not care how big the model is, and the `tiny` preset takes seconds a step on two
# busy cores: a one-layer decoder keeps each real trainer run to its start-up time.
SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
         "model.ffn_dim=64", "data.seq_len=32", "data.micro_batch_size=2",
         "trainer.log_every_n_steps=1", "optim.warmup_steps=1"]
PROGRESS_LINE = re.compile(r"step (\d+)/\d+\s+loss (\S+)")  # the log: a line a step, so few

# A user's own LightningModule, reached through `model._target_` as users do. It knows nothing of
# ultramesh; its knobs (a pause per step, a failure at a step) come from `model.kwargs`.
USER_MODULE = "tracking_user_model"
USER_MODULE_SOURCE = '''
import builtins
import time

import pytorch_lightning as pl
import torch


class Bigram(pl.LightningModule):
    def __init__(self, vocab: int, step_seconds: float = 0.0, fail_at: int = 0,
                 failure: str = "RuntimeError"):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)
        self.step_seconds, self.fail_at, self.failure = step_seconds, fail_at, failure

    def training_step(self, batch, batch_idx):
        if self.global_step + 1 == self.fail_at:
            raise getattr(builtins, self.failure)(f"injected failure at step {self.fail_at}")
        time.sleep(self.step_seconds)
        inputs, targets = batch
        logits = self.table(inputs)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)
'''


def user_model(**kwargs: object) -> list[str]:
    """Overrides that train the user's module, built with `kwargs`."""
    return [f"model._target_={USER_MODULE}.Bigram", "+model.kwargs.vocab=256",
            *(f"+model.kwargs.{key}={value}" for key, value in kwargs.items())]


def tracked_by(uri: str, experiment: str) -> list[str]:
    return [f"tracking.uri={uri}", f"tracking.experiment={experiment}"]


def new_experiment(what: str) -> str:
    """One experiment per test (the server is shared by the session), so its runs are all ours."""
    return f"{what}-{uuid.uuid4().hex[:8]}"


def configure(uri: str, experiment: str, *extra: str) -> tuple:
    """Config for tests that drive `Tracking` without training."""
    overrides = [*tracked_by(uri, experiment), "trainer.max_steps=8", "optim.warmup_steps=1",
                 *extra]
    cfg = compose(overrides)
    return validate(cfg), OmegaConf.to_container(cfg, resolve=True), overrides


def fit_in_process(run_dir: Path, *overrides: str) -> FitResult:
    """What `python -m trainer <overrides> hydra.run.dir=<run_dir>` runs, minus Hydra's own run."""
    overrides = [*SMALL, *overrides]
    cfg = compose(overrides)
    # the trainer exports its seed (PL_GLOBAL_SEED) and MLflow's HTTP settings for its own
    # process; here that process is pytest's, and later tests must not inherit them
    with mock.patch.dict(os.environ):
        return fit(validate(cfg), run_dir=run_dir,
                   resolved=OmegaConf.to_container(cfg, resolve=True), overrides=overrides)


def only_run(client: MlflowClient, experiment: str) -> Run:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def now_ms() -> int:
    """MLflow's clock for a metric point: the logging process's wall time in milliseconds."""
    return int(time.time() * 1000)


# --- `python -m trainer` in a subprocess ----------------------------------------------------------


class TrainerProcess:
    """`python -m trainer <overrides>`, its output (the log is on stderr) read line by line."""

    def __init__(self, cwd: Path, *overrides: str, env: Mapping[str, str] | None = None):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainer", *overrides], cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_for(self, pattern: str, timeout_s: float = 180) -> re.Match:
        """Read the output up to the first line that matches `pattern`."""
        watchdog = threading.Timer(timeout_s, self.process.kill)  # ends the read below
        watchdog.start()
        try:
            for line in self.process.stdout:  # type: ignore[union-attr]
                self.lines.append(line.rstrip())
                if found := re.search(pattern, line):
                    return found
        finally:
            watchdog.cancel()
        self.process.kill()
        pytest.fail(f"no line matching {pattern!r} from the trainer:\n{self.tail}")

    def finish(self, timeout_s: float = 180) -> int:
        out, _ = self.process.communicate(timeout=timeout_s)
        self.lines += out.splitlines()
        return self.process.returncode

    def found(self, pattern: str) -> list[re.Match]:
        return [m for line in self.lines if (m := re.search(pattern, line))]

    @property
    def tail(self) -> str:
        return "\n".join(self.lines[-60:])


@pytest.fixture
def start_trainer() -> Iterator:
    """Starts `python -m trainer` processes; whatever a failed test left running is killed."""
    started: list[TrainerProcess] = []

    def start(cwd: Path, *overrides: str, env: Mapping[str, str] | None = None
              ) -> TrainerProcess:
        started.append(TrainerProcess(cwd, *overrides, env=env))
        return started[-1]

    yield start
    for job in started:
        if job.process.poll() is None:
            job.process.kill()
            job.process.communicate()


def train(job: TrainerProcess) -> TrainerProcess:
    assert job.finish() == 0, job.tail
    return job


@pytest.fixture(scope="module")
def user_module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user-module")
    (path / f"{USER_MODULE}.py").write_text(USER_MODULE_SOURCE)
    return path


def test_backend_none_turns_tracking_off(tmp_path: Path):
    run = validate(compose(["tracking=none"]))
    assert tracking.setup(run, run_dir=tmp_path, resolved_config={}, overrides=[],
                          mesh_shape=MESH, rank=0) is None


# --- one finished `python -m trainer` run, inspected through MlflowClient ------------------------

NOTES = "n" * (MAX_PARAM_VAL_LENGTH + 10)  # one config value longer than an MLflow param holds


@dataclass
class FinishedRun:
    client: MlflowClient
    run: Run
    run_dir: Path
    overrides: list[str]
    printed_losses: dict[int, float]  # step -> loss, as the trainer's own log printed it


@pytest.fixture(scope="module")
def finished_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[FinishedRun]:
    workdir = tmp_path_factory.mktemp("finished-run")
    run_dir = workdir / "run"
    experiment = new_experiment("finished")
    overrides = [
        *SMALL, *tracked_by(mlflow_server, experiment), "trainer.max_steps=6",
        "checkpoint.every_n_steps=4",
        f"+data.storage_options.secret={STORAGE_SECRET}",
        # the secret of the environment, inside a value whose key says nothing
        f"+data.storage_options.endpoint_url='https://s3.example/?sig={AWS_SECRET}'",
        f"+model.kwargs.notes={NOTES}",
    ]
    env = {"AWS_SECRET_ACCESS_KEY": AWS_SECRET, "SLURM_JOB_ID": "4242",
           tracking.K8S_JOB_NAME_ENV: "pretrain-7b-x2"}
    job = TrainerProcess(workdir, *overrides, f"hydra.run.dir={run_dir}", env=env)
    try:
        train(job)
    finally:
        if job.process.poll() is None:
            job.process.kill()
    client = MlflowClient(mlflow_server)
    printed = {int(m[1]): float(m[2]) for m in job.found(PROGRESS_LINE.pattern)}
    yield FinishedRun(client, only_run(client, experiment), run_dir, overrides, printed)


@pytest.mark.slow
def test_run_finishes_with_every_step_of_the_loss(finished_run: FinishedRun):
    run, client = finished_run.run, finished_run.client
    assert run.info.status == "FINISHED"
    assert sorted(finished_run.printed_losses) == list(range(1, 7))
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 7))
    for point in history:
        assert point.value == pytest.approx(finished_run.printed_losses[point.step], abs=5e-5)
    assert steps(client, run.info.run_id, "train/lr") == list(range(1, 7))


@pytest.mark.slow
def test_config_is_logged_as_dotted_params_without_secrets(finished_run: FinishedRun):
    params = finished_run.run.data.params
    expected = OmegaConf.to_container(compose(finished_run.overrides), resolve=True)
    assert params["trainer.max_steps"] == "6" and params["model.dim"] == "32"
    assert float(params["optim.lr"]) == expected["optim"]["lr"]
    assert params["model.name"] == "tiny" and params["checkpoint.resume"] == "null"
    assert params["hardware.launch_env"] == "{}"
    assert "data.storage_options.secret" in params
    assert params["data.storage_options.endpoint_url"].startswith("https://s3.example/?sig=")
    notes = params["model.kwargs.notes"]
    assert len(notes) <= MAX_PARAM_VAL_LENGTH and "truncated" in notes
    assert notes.startswith("n" * 1000)
    for value in params.values():
        assert STORAGE_SECRET not in value and AWS_SECRET not in value


@pytest.mark.slow
def test_tags_say_where_and_what_ran(finished_run: FinishedRun):
    tags = finished_run.run.data.tags
    hardware = compose(finished_run.overrides).hardware
    assert tags["hardware"] == "cpu" and tags["instance_type"] == hardware.instance_type
    assert tags["world_size"] == "1" and tags["model"] == "tiny" and "model.target" not in tags
    assert tags["mesh"] == "1x1x1x1 (dp_replicate x dp_shard x cp x tp)"  # one rank
    assert tags["slurm.job_id"] == "4242" and tags["k8s.job_name"] == "pretrain-7b-x2"
    assert tags["mlflow.source.type"] == "JOB"  # SLURM_JOB_ID was set
    assert tags["mlflow.source.name"] == f"{Path(sys.executable).name} -m trainer"
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    assert tags["git.dirty"] == str(bool(git("status", "--porcelain"))).lower()
    assert tags["attempt"] == "1"
    for value in tags.values():
        assert STORAGE_SECRET not in value and AWS_SECRET not in value


@pytest.mark.slow
def test_checkpoints_are_events_and_never_bytes(finished_run: FinishedRun):
    client, run = finished_run.client, finished_run.run
    run_id = run.info.run_id
    # every 4 steps, and once more where the run ends
    assert steps(client, run_id, "checkpoint/step") == [4, 6]
    last = finished_run.run_dir / "checkpoints" / "step-00000006.ckpt"
    assert run.data.tags["checkpoint.latest_url"] == str(last.resolve())
    assert run.data.tags["checkpoint.latest_step"] == "6"
    sizes = client.get_metric_history(run_id, "checkpoint/bytes")
    # a checkpoint is a directory; its manifest counts every file but itself
    assert max(sizes, key=lambda m: m.step).value == sum(
        f.stat().st_size for f in last.iterdir() if f.name != "manifest.json")
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "checkpoint/seconds"))
    # the config and overrides, nothing else: no checkpoint went up as an artifact
    assert sorted(all_artifacts(client, run_id)) == ["config/overrides.yaml",
                                                     "config/resolved.yaml"]


@pytest.mark.slow
def test_config_and_overrides_are_redacted_artifacts(finished_run: FinishedRun,
                                                     tmp_path: Path):
    client, run_id = finished_run.client, finished_run.run.info.run_id
    root = Path(client.download_artifacts(run_id, "config", str(tmp_path)))
    resolved_text = (root / "resolved.yaml").read_text()
    logged = yaml.safe_load(resolved_text)
    expected = OmegaConf.to_container(compose(finished_run.overrides), resolve=True)
    assert logged["optim"] == expected["optim"] and logged["model"]["dim"] == 32
    assert logged["model"]["kwargs"]["notes"] == NOTES  # the artifact keeps what params cut
    assert set(logged["data"]["storage_options"]) == {"secret", "endpoint_url"}
    overrides = yaml.safe_load((root / "overrides.yaml").read_text())
    assert len(overrides) == len(finished_run.overrides)
    for written, given in zip(overrides, finished_run.overrides, strict=True):
        if STORAGE_SECRET in given or AWS_SECRET in given:
            assert written.split("=")[0] == given.split("=")[0]
        else:
            assert written == given
    for text in (resolved_text, "\n".join(overrides)):
        assert STORAGE_SECRET not in text and AWS_SECRET not in text


@pytest.mark.slow
def test_run_file_names_the_run(finished_run: FinishedRun, mlflow_server: str):
    record = json.loads((finished_run.run_dir / "mlflow_run.json").read_text())
    run_id = finished_run.run.info.run_id
    assert record["run_id"] == run_id
    assert record["ui"].startswith(mlflow_server) and record["ui"].endswith(run_id)


# --- the run's page in the MLflow UI ----------------------------------------------------------


@pytest.mark.slow
def test_run_page_shows_the_loss_chart(finished_run: FinishedRun, mlflow_server: str,
                                       chromium: str, tmp_path: Path):
    run = finished_run.run
    page = (f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            "/model-metrics?workflowType=machine_learning")  # the UI's view for training runs
    screenshot = tmp_path / "run-page.png"
    # flags found by trial: with a smaller time budget the chart is still a spinner. The UI draws
    # only the chart groups in view and `train/` comes last of the trainer's four: a tall window.
    rendered = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw",
         "--window-size=1400,2600", f"--screenshot={screenshot}", "--dump-dom", page],
        capture_output=True, text=True, timeout=120)
    dom = rendered.stdout
    assert screenshot.stat().st_size > 10_000, rendered.stderr[-2000:]
    titles = re.findall(r'<h4[^>]*title="([^"]+)"', dom)
    assert "train/loss" in titles, f"chart titles: {titles}"
    card = dom[dom.index('title="train/loss"'):]
    line = re.search(r'class="js-line" d="M([^"]*)"', card)
    assert line, "the loss chart has no line"
    assert line.group(1).count("L") + 1 == len(finished_run.printed_losses)


# --- how a run ends --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("failure", "raised", "status"), [
    ("RuntimeError", RuntimeError, "FAILED"),
    ("KeyboardInterrupt", SystemExit, "KILLED"),  # Lightning turns Ctrl-C into sys.exit(1)
])
def test_an_exception_ends_the_run_with_its_status(
        mlflow_server: str, tmp_path: Path, user_module_dir: Path,
        monkeypatch: pytest.MonkeyPatch, failure: str, raised: type, status: str):
    monkeypatch.syspath_prepend(str(user_module_dir))
    experiment = new_experiment("failure")
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C once it has seen one
    try:
        with pytest.raises(raised):
            fit_in_process(tmp_path, *tracked_by(mlflow_server, experiment), "trainer.max_steps=6",
                           *user_model(fail_at=3, failure=failure))
    finally:
        signal.signal(signal.SIGINT, sigint)
    client = MlflowClient(mlflow_server)
    run = only_run(client, experiment)
    assert run.info.status == status
    assert run.data.tags["model.target"] == f"{USER_MODULE}.Bigram"
    assert steps(client, run.info.run_id) == [1, 2]  # the steps before the failure, all of them


class ResumableJob:
    """10 steps of the user's model, a checkpoint every 4, resuming from the newest one under a
    stable run dir. A quarter second a step leaves time to signal it after its first checkpoint."""

    def __init__(self, uri: str, name: str, tmp_path: Path, user_module_dir: Path,
                 start_trainer):
        self.experiment = new_experiment(name)
        self.client = MlflowClient(uri)
        self.cwd, self.start_trainer = tmp_path, start_trainer
        self.args = [*SMALL, *tracked_by(uri, self.experiment), "trainer.max_steps=10",
                     "checkpoint.every_n_steps=4", "checkpoint.resume=last",
                     f"hydra.run.dir={tmp_path / 'run'}", *user_model(step_seconds=0.25)]
        self.env = {"PYTHONPATH": str(user_module_dir)}

    def start(self):
        return self.start_trainer(self.cwd, *self.args, env=self.env)

    def start_until_the_first_checkpoint(self):
        first = self.start()
        first.wait_for(r"checkpoint step 4:")
        return first

    def resume_as_attempt_2(self, run_id: str) -> tuple[list[int], list[int]]:
        """Start again to the end: the same run must finish as attempt 2. The `train/loss` steps
        it holds from before the restart and from after it."""
        resumed_at = now_ms()
        train(self.start())
        run = only_run(self.client, self.experiment)
        assert run.info.run_id == run_id
        assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2"
        history = self.client.get_metric_history(run_id, "train/loss")
        return (sorted(m.step for m in history if m.timestamp < resumed_at),
                sorted(m.step for m in history if m.timestamp >= resumed_at))


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_a_resume_continues_it(
        mlflow_server: str, tmp_path: Path, user_module_dir: Path, start_trainer):
    job = ResumableJob(mlflow_server, "sigterm", tmp_path, user_module_dir, start_trainer)
    client, experiment = job.client, job.experiment
    first = job.start_until_the_first_checkpoint()
    first.process.send_signal(signal.SIGTERM)
    # A preempted job must not look successful to its scheduler: 128 + SIGTERM, as a shell says.
    assert first.finish() == 128 + signal.SIGTERM, first.tail
    run_id = only_run(client, experiment).info.run_id
    assert client.get_run(run_id).info.status == "KILLED", first.tail
    killed_at = max(steps(client, run_id))
    assert 4 <= killed_at < 10

    before, after = job.resume_as_attempt_2(run_id)
    # the killed attempt sent every step it trained; the resumed one starts after its newest
    # checkpoint and goes on to the end
    last_checkpoint = max(int(m[1]) for m in first.found(r"checkpoint step (\d+):"))
    assert before == list(range(1, killed_at + 1))
    assert after == list(range(last_checkpoint + 1, 11))
    paths = all_artifacts(client, run_id)
    assert "attempts/2/resolved.yaml" in paths and "config/resolved.yaml" in paths


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_loses_no_step_and_the_resume_continues_the_run(
        mlflow_server: str, tmp_path: Path, user_module_dir: Path, start_trainer):
    job = ResumableJob(mlflow_server, "sigkill", tmp_path, user_module_dir, start_trainer)
    client, experiment = job.client, job.experiment
    first = job.start_until_the_first_checkpoint()
    first.process.kill()  # no handler runs, nothing is flushed on the way out
    assert first.finish() == -signal.SIGKILL
    run_id = only_run(client, experiment).info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody was left to end it

    before, after = job.resume_as_attempt_2(run_id)
    assert {1, 2, 3, 4} <= set(before)  # in MLflow by the time checkpoint 4 was committed
    assert after == list(range(5, 11))


@pytest.mark.slow
def test_log_every_n_steps_thins_what_is_sent(mlflow_server: str, tmp_path: Path):
    experiment = new_experiment("thinned")
    fit_in_process(tmp_path, *tracked_by(mlflow_server, experiment), "trainer.max_steps=10",
                   "trainer.log_every_n_steps=2", "tracking.log_every_n_steps=3",
                   "checkpoint.every_n_steps=5")
    client = MlflowClient(mlflow_server)
    run_id = only_run(client, experiment).info.run_id
    # the trainer logs at steps 2, 4, 6, 8, 10; a step is kept once 3 have passed since the last
    assert steps(client, run_id) == [2, 6, 10]
    assert steps(client, run_id, "perf/step_seconds") == [2, 6, 10]
    assert steps(client, run_id, "checkpoint/step") == [5, 10]  # events are never thinned


@pytest.mark.slow
def test_multirun_is_a_parent_run_with_a_child_per_job(mlflow_server: str, tmp_path: Path,
                                                       start_trainer):
    experiment = new_experiment("sweep")
    train(start_trainer(tmp_path, "--multirun", "seed=1,2", f"hydra.sweep.dir={tmp_path}/sweep",
                        *SMALL, *tracked_by(mlflow_server, experiment), "trainer.max_steps=3",
                        "checkpoint.every_n_steps=0"))
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted((r.data.tags["sweep.job"], r.data.params["seed"]) for r in children) == [
        ("0", "1"), ("1", "2")]
    for child in children:
        assert child.info.status == "FINISHED"
        assert steps(client, child.info.run_id) == [1, 2, 3]


@pytest.mark.slow
def test_system_metrics_are_logged_when_switched_on(mlflow_server: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    try:
        import psutil  # noqa: F401
    except ImportError:
        require("psutil", "MLflow's system metrics read CPU and memory through it")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    run, resolved, overrides = configure(mlflow_server, "system", "tracking.system_metrics=true")
    track = tracking.setup(run, run_dir=tmp_path, resolved_config=resolved, overrides=overrides,
                           mesh_shape=MESH, rank=0)
    track.open()
    time.sleep(1.5)
    track.close("FINISHED")
    metrics = MlflowClient(mlflow_server).get_run(track.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0


# --- a server that is missing, slow or flaky -------------------------------------------------


def unused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_server_is_one_warning_and_training_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    nobody = unused_url()
    with caplog.at_level(logging.WARNING, logger="trainer.tracking"):
        result = fit_in_process(tmp_path, *tracked_by(nobody, "unreachable"),
                                "trainer.max_steps=3", "checkpoint.every_n_steps=0")
    warnings = [r for r in caplog.records if r.name.startswith("trainer.tracking")]
    assert len(warnings) == 1 and nobody in warnings[0].getMessage()
    assert result.run_id is None and not (tmp_path / "mlflow_run.json").exists()
    assert result.checkpoint and result.checkpoint.endswith("step-00000003.ckpt")
    assert math.isfinite(result.metrics["train/loss"])


def test_unreachable_server_can_stop_the_run_instead(tmp_path: Path):
    nobody = unused_url()
    run, resolved, overrides = configure(nobody, "unreachable", "tracking.fail_on_unreachable=true")
    with pytest.raises(tracking.TrackingUnavailable, match=re.escape(nobody)):
        tracking.setup(run, run_dir=tmp_path, resolved_config=resolved, overrides=overrides,
                       mesh_shape=MESH, rank=0)


class FlakyProxy:
    """A TCP proxy in front of the real server that delays every request by `delay_s`, and while
    `down` refuses connections and cuts the open ones: a slow, then unreachable, server."""

    def __init__(self, upstream_port: int, delay_s: float):
        self.delay_s, self.down = delay_s, False
        self._upstream = ("127.0.0.1", upstream_port)
        self._open: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:
            for conn in self._open:
                self._cut(conn)
            self._open.clear()

    @staticmethod
    def _cut(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # unlike close, wakes a blocked recv and tells the peer
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    def close(self) -> None:
        self._listener.close()
        self.set_down(True)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            upstream = socket.create_connection(self._upstream)
            self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, self.delay_s),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, delay_s: float) -> None:
        try:
            while chunk := source.recv(65536):
                time.sleep(delay_s)
                sink.sendall(chunk)
        except OSError:
            pass
        for conn in (source, sink):
            FlakyProxy._cut(conn)


@pytest.mark.slow
def test_slow_then_unreachable_server_never_stalls_a_step_nor_loses_a_point(
        mlflow_server: str, tmp_path: Path):
    # Not a training run: the outage has to start and end at chosen steps and each logging call
    # is timed on its own, over enough steps (400) to cross an outage; the trainer's steps would
    # add only their time. `Tracking.log_metrics` is the call the trainer makes each step.
    proxy = FlakyProxy(int(mlflow_server.rsplit(":", 1)[1]), delay_s=0.3)
    try:
        run, resolved, overrides = configure(proxy.url, "flaky")
        track = tracking.setup(run, run_dir=tmp_path, resolved_config=resolved,
                               overrides=overrides, mesh_shape=MESH, rank=0)
        track.open()
        slowest = 0.0
        for step in range(1, 401):
            if step == 201:
                proxy.set_down(True)
            if step == 301:
                time.sleep(1.0)  # let the sender hit the outage
                proxy.set_down(False)
            start = time.perf_counter()
            track.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3, "perf/mfu": 0.4},
                              step=step)
            slowest = max(slowest, time.perf_counter() - start)
            time.sleep(0.002)
        track.close("FINISHED")
    finally:
        proxy.close()
    assert slowest < 0.1  # a call that waited for the server would take a delayed request, 0.3 s
    client = MlflowClient(mlflow_server)
    assert client.get_run(track.run_id).info.status == "FINISHED"
    history = client.get_metric_history(track.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 401))
    assert all(m.value == pytest.approx(1.0 / m.step) for m in history)
