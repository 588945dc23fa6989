"""MLflow tracking against a real `mlflow server`: what a run records, that logging never waits for
the server, and that one run survives kills and resumes. One test renders the run's page in
headless Chromium."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from conftest import require
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf
from tracking_app import ReportingCheckpoint, TinyRegression

from trainer import tracking
from trainer.config import compose, validate

REPO = Path(__file__).resolve().parents[1]
APP = Path(__file__).with_name("tracking_app.py")
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
STORAGE_KEY = "AKIAIOSFODNN7EXAMPLE"
HF_TOKEN = "hf_abcdefghijklmnop"
MESH = {"dp_replicate": 1, "dp_shard": 1, "tp": 1}


def configure(uri: str, experiment: str, *extra: str) -> tuple:
    overrides = [f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                 "trainer.max_steps=8", "optim.warmup_steps=1", *extra]
    cfg = compose(overrides)
    return validate(cfg), OmegaConf.to_container(cfg, resolve=True), overrides


def fit(track: tracking.Tracking, workdir: Path, *, max_steps: int, every: int = 4,
        **model_args) -> TinyRegression:
    model = TinyRegression(lr=0.05, **model_args)
    checkpoints = ReportingCheckpoint(track, dirpath=workdir / "ckpt", save_top_k=0,
                                      save_last=True, every_n_train_steps=every)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=track.logger,
                         callbacks=[checkpoints, *track.callbacks], default_root_dir=workdir,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model)
    return model


def steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


# --- redaction and params, no server ------------------------------------------------------------


@pytest.mark.parametrize(("key", "secret"), [
    ("checkpoint.storage_options.key", True), ("aws_secret_access_key", True),
    ("hfToken", True), ("db.password", True), ("GOOGLE_APPLICATION_CREDENTIALS", True),
    ("data.tokenizer", False), ("checkpoint.keep_last", False), ("model.kwargs", False),
    ("train/tokens_per_s", False),
])
def test_secret_keys_are_recognised_by_word(key: str, secret: bool):
    assert tracking.looks_secret(key) is secret


def test_redactor_hides_secret_values_in_trees_and_text():
    redactor = tracking.Redactor.from_env({"AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    tree = {"storage_options": {"key": STORAGE_KEY, "endpoint": f"https://x/?sig={AWS_SECRET}"},
            "lr": 0.1}
    hidden = redactor.tree(tree)
    assert STORAGE_KEY not in str(hidden) and AWS_SECRET not in str(hidden)
    assert hidden["lr"] == 0.1 and hidden["storage_options"]["endpoint"].startswith("https://x/")
    script = (f"export AWS_SECRET_ACCESS_KEY={AWS_SECRET}\nexport HF_TOKEN='{HF_TOKEN}'\n"
              f"aws s3 cp --secret-key {STORAGE_KEY} x y\nsrun python -m trainer\n")
    text = redactor.text(script)
    for secret in (AWS_SECRET, HF_TOKEN, STORAGE_KEY):
        assert secret not in text
    assert "srun python -m trainer" in text and "export HF_TOKEN=" in text


def test_long_values_are_truncated_with_a_marker():
    long = "x" * (MAX_PARAM_VAL_LENGTH + 500)
    params = tracking.config_params({"model": {"kwargs": {"notes": long}, "dim": 64}},
                                    tracking.Redactor())
    value = params["model.kwargs.notes"]
    assert len(value) <= MAX_PARAM_VAL_LENGTH and "truncated" in value
    assert value.startswith("x" * 1000) and params["model.dim"] == "64"


def test_backend_none_turns_tracking_off(tmp_path: Path):
    run = validate(compose(["tracking=none"]))
    assert tracking.setup(run, run_dir=tmp_path, resolved_config={}, overrides=[],
                          mesh_shape=MESH, rank=0) is None


# --- one finished run, inspected through MlflowClient -------------------------------------------


@pytest.fixture(scope="module")
def finished_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    workdir = tmp_path_factory.mktemp("finished-run")
    env = {"SLURM_JOB_ID": "4242", tracking.K8S_JOB_NAME_ENV: "pretrain-7b-x2",
           "AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        run, resolved, overrides = configure(
            mlflow_server, f"finished-{uuid.uuid4().hex[:8]}",
            f"+checkpoint.storage_options.key={STORAGE_KEY}",
            f"+checkpoint.storage_options.endpoint_url='https://s3.example/?sig={AWS_SECRET}'",
            f"+model.kwargs.notes={'n' * (MAX_PARAM_VAL_LENGTH + 10)}")
        launch = ("sbatch.sh", f"#!/bin/bash\nexport AWS_SECRET_ACCESS_KEY={AWS_SECRET}\n"
                               f"export HF_TOKEN={HF_TOKEN}\nsrun python -m trainer\n")
        track = tracking.setup(run, run_dir=workdir, resolved_config=resolved,
                               overrides=overrides, mesh_shape={"dp_replicate": 2, "dp_shard": 4,
                                                                "tp": 8},
                               rank=0, launch_artifact=launch)
        model = fit(track, workdir, max_steps=8)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    client = MlflowClient(mlflow_server)
    yield {"client": client, "run": client.get_run(track.run_id), "model": model,
           "resolved": resolved, "overrides": overrides, "workdir": workdir, "track": track}


@pytest.mark.slow
def test_run_finishes_with_every_step_of_the_loss(finished_run: dict):
    run, model, client = finished_run["run"], finished_run["model"], finished_run["client"]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == model.logged
    assert [step for step, _ in model.logged] == list(range(1, 9))


@pytest.mark.slow
def test_config_is_logged_as_dotted_params_without_secrets(finished_run: dict):
    params = finished_run["run"].data.params
    resolved = finished_run["resolved"]
    assert params["trainer.max_steps"] == "8"
    assert float(params["optim.lr"]) == resolved["optim"]["lr"]
    assert params["model.name"] == "tiny" and params["checkpoint.resume"] == "null"
    assert params["hardware.launch_env"] == "{}"
    assert "checkpoint.storage_options.key" in params
    long_value = params["model.kwargs.notes"]
    assert len(long_value) <= MAX_PARAM_VAL_LENGTH and "truncated" in long_value
    for value in params.values():
        assert STORAGE_KEY not in value and AWS_SECRET not in value


@pytest.mark.slow
def test_tags_say_where_and_what_ran(finished_run: dict):
    tags = finished_run["run"].data.tags
    assert tags["hardware"] == "cpu" and tags["instance_type"] == "local"
    assert tags["world_size"] == "1" and tags["model"] == "tiny"
    assert tags["mesh"].startswith("2x4x8") and "dp_replicate x dp_shard x tp" in tags["mesh"]
    assert tags["slurm.job_id"] == "4242" and tags["k8s.job_name"] == "pretrain-7b-x2"
    assert tags["mlflow.source.type"] == "JOB"  # SLURM_JOB_ID was set
    assert tags["mlflow.source.name"].startswith(Path(sys.orig_argv[0]).name)
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    assert tags["git.dirty"] == str(bool(git("status", "--porcelain"))).lower()
    last = finished_run["workdir"] / "ckpt" / "last.ckpt"
    assert tags["checkpoint.latest_url"] == last.resolve().as_uri()
    assert tags["checkpoint.latest_step"] == "8"


@pytest.mark.slow
def test_checkpoints_are_events_and_never_bytes(finished_run: dict):
    client, run_id = finished_run["client"], finished_run["run"].info.run_id
    assert steps(client, run_id, "checkpoint/step") == [4, 8]
    sizes = [m.value for m in client.get_metric_history(run_id, "checkpoint/bytes")]
    assert sizes[-1] == (finished_run["workdir"] / "ckpt" / "last.ckpt").stat().st_size
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "checkpoint/seconds"))
    assert not [p for p in all_artifacts(client, run_id) if p.endswith(".ckpt")]


@pytest.mark.slow
def test_config_overrides_and_launch_script_are_redacted_artifacts(finished_run: dict):
    client, run_id = finished_run["client"], finished_run["run"].info.run_id
    paths = set(all_artifacts(client, run_id))
    assert {"config/resolved.yaml", "config/overrides.yaml", "launch/sbatch.sh"} <= paths
    root = client.download_artifacts(run_id, "", str(finished_run["workdir"] / "artifacts"))
    resolved_text = Path(root, "config/resolved.yaml").read_text()
    logged = yaml.safe_load(resolved_text)
    assert logged["optim"] == finished_run["resolved"]["optim"]
    notes = finished_run["resolved"]["model"]["kwargs"]["notes"]
    assert logged["model"]["kwargs"]["notes"] == notes  # the artifact keeps what params cut
    overrides = yaml.safe_load(Path(root, "config/overrides.yaml").read_text())
    assert len(overrides) == len(finished_run["overrides"])
    script = Path(root, "launch/sbatch.sh").read_text()
    assert "srun python -m trainer" in script
    for text in (resolved_text, "\n".join(overrides), script):
        for secret in (AWS_SECRET, STORAGE_KEY, HF_TOKEN):
            assert secret not in text


@pytest.mark.slow
def test_run_file_names_the_run(finished_run: dict):
    record = json.loads((finished_run["workdir"] / "mlflow_run.json").read_text())
    run_id = finished_run["run"].info.run_id
    assert record["run_id"] == run_id and run_id in finished_run["track"].ui_hint


# --- status on failure ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("failure", "raised", "status"), [
    (RuntimeError, RuntimeError, "FAILED"),
    (KeyboardInterrupt, SystemExit, "KILLED"),  # Lightning turns Ctrl-C into sys.exit(1)
])
def test_an_exception_ends_the_run_with_its_status(mlflow_server: str, tmp_path: Path,
                                                   failure, raised, status: str):
    run, resolved, overrides = configure(mlflow_server, "failures")
    track = tracking.setup(run, run_dir=tmp_path, resolved_config=resolved, overrides=overrides,
                           mesh_shape=MESH, rank=0)
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C once it has seen one
    try:
        with pytest.raises(raised):
            fit(track, tmp_path, max_steps=8, fail_at=3, failure=failure)
    finally:
        signal.signal(signal.SIGINT, sigint)
    client = MlflowClient(mlflow_server)
    assert client.get_run(track.run_id).info.status == status
    assert steps(client, track.run_id) == [1, 2]


@pytest.mark.slow
def test_log_every_n_steps_thins_what_is_sent(mlflow_server: str, tmp_path: Path):
    run, resolved, overrides = configure(mlflow_server, "thinned", "tracking.log_every_n_steps=3")
    track = tracking.setup(run, run_dir=tmp_path, resolved_config=resolved, overrides=overrides,
                           mesh_shape=MESH, rank=0)
    track.open()
    for step in range(1, 11):
        track.log_metrics({"train/loss": float(step)}, step=step)
        track.log_metrics({"perf/step_seconds": 0.1}, step=step)  # a second call, same step
    track.log_checkpoint(5, "file:///ckpt/step-5", 1.0, 10)  # events are never thinned
    track.close("FINISHED")
    client = MlflowClient(mlflow_server)
    assert steps(client, track.run_id) == [1, 4, 7, 10]
    assert steps(client, track.run_id, "perf/step_seconds") == [1, 4, 7, 10]
    assert steps(client, track.run_id, "checkpoint/step") == [5]


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


def test_unreachable_server_is_one_warning_and_training_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"
    run, resolved, overrides = configure(nobody, "unreachable")
    with caplog.at_level(logging.WARNING, logger="trainer.tracking"):
        track = tracking.setup(run, run_dir=tmp_path, resolved_config=resolved,
                               overrides=overrides, mesh_shape=MESH, rank=0)
        model = fit(track, tmp_path, max_steps=3, every=2)
    warnings = [r for r in caplog.records if r.name == "trainer.tracking"]
    assert len(warnings) == 1 and nobody in warnings[0].getMessage()
    assert [step for step, _ in model.logged] == [1, 2, 3] and track.run_id is None


def test_unreachable_server_can_stop_the_run_instead(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"
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
    assert slowest < 0.01  # 30x under one delayed request: the step never waited for the server
    client = MlflowClient(mlflow_server)
    assert client.get_run(track.run_id).info.status == "FINISHED"
    history = client.get_metric_history(track.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 401))
    assert all(m.value == pytest.approx(1.0 / m.step) for m in history)


# --- one run across kills and resumes (real processes) ----------------------------------------


class App:
    """`tests/tracking_app.py` in a subprocess, read line by line."""

    def __init__(self, workdir: Path, *overrides: str, step_s: float = 0.0):
        env = {**os.environ, "TRACKING_APP_STEP_S": str(step_s), "PYTHONPATH": str(REPO),
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(APP), f"hydra.run.dir={workdir}", *overrides],
            cwd=workdir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)

    def wait_for(self, line: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        for got in self.process.stdout:  # type: ignore[union-attr]
            self.lines.append(got.rstrip())
            if got.strip() == line:
                return
            if time.monotonic() > deadline:
                break
        self.process.kill()
        pytest.fail(f"no {line!r} from the app:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout_s: float = 90) -> int:
        out, _ = self.process.communicate(timeout=timeout_s)
        self.lines += out.splitlines()
        return self.process.returncode

    def value(self, prefix: str) -> str:
        return [line for line in self.lines if line.startswith(prefix)][-1].split()[1]


@pytest.mark.slow
def test_one_run_survives_a_kill_and_a_resume(mlflow_server: str, tmp_path: Path):
    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    args = [f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}",
            "trainer.max_steps=10", "optim.warmup_steps=1", "checkpoint.every_n_steps=3",
            "checkpoint.resume=last"]
    workdir = tmp_path / "run"
    client = MlflowClient(mlflow_server)

    first = App(workdir, *args, step_s=0.3)
    first.wait_for("checkpoint 3")
    first.process.send_signal(signal.SIGTERM)
    first.finish()
    run_id = first.value("run")
    assert client.get_run(run_id).info.status == "KILLED"
    killed_at = max(steps(client, run_id))
    resumed_at = time.time() * 1000

    second = App(workdir, *args)
    assert second.finish() == 0, "\n".join(second.lines[-40:])
    assert second.value("run") == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2"
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [run_id]
    history = client.get_metric_history(run_id, "train/loss")
    # the killed attempt sent every step it finished; the resumed one repeats those after its
    # checkpoint and goes on to the end
    last_checkpoint = int(first.value("checkpoint"))
    assert {m.step for m in history if m.timestamp < resumed_at} == set(range(1, killed_at + 1))
    assert sorted(m.step for m in history if m.timestamp >= resumed_at) == list(
        range(last_checkpoint + 1, 11))
    paths = all_artifacts(client, run_id)
    assert "attempts/2/resolved.yaml" in paths and "config/resolved.yaml" in paths


@pytest.mark.slow
def test_multirun_is_a_parent_run_with_a_child_per_job(mlflow_server: str, tmp_path: Path):
    experiment = f"sweep-{uuid.uuid4().hex[:8]}"
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run(
        [sys.executable, str(APP), "-m", "seed=1,2", f"hydra.sweep.dir={sweep_dir}",
         f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}",
         "trainer.max_steps=3", "optim.warmup_steps=1", "checkpoint.every_n_steps=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted((r.data.tags["sweep.job"], r.data.params["seed"]) for r in children) == [
        ("0", "1"), ("1", "2")]
    assert all(r.info.status == "FINISHED" for r in children)


# --- the run's page in the MLflow UI ----------------------------------------------------------


@pytest.mark.slow
def test_run_page_shows_the_loss_chart(finished_run: dict, mlflow_server: str, chromium: str,
                                       tmp_path: Path):
    run = finished_run["run"]
    page = (f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            "/model-metrics?workflowType=machine_learning")  # the UI's view for training runs
    screenshot = tmp_path / "run-page.png"
    # flags from NOTES.md: with a smaller time budget the chart is still a spinner
    rendered = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw",
         "--window-size=1400,900", f"--screenshot={screenshot}", "--dump-dom", page],
        capture_output=True, text=True, timeout=120)
    dom = rendered.stdout
    assert screenshot.stat().st_size > 10_000, rendered.stderr[-2000:]
    titles = re.findall(r'<h4[^>]*title="([^"]+)"', dom)
    assert "train/loss" in titles, f"chart titles: {titles}"
    card = dom[dom.index('title="train/loss"'):]
    line = re.search(r'class="js-line" d="M([^"]*)"', card)
    assert line, "the loss chart has no line"
    points = line.group(1).count("L") + 1
    assert points == len(finished_run["model"].logged)
