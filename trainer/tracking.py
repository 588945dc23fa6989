"""MLflow experiment tracking: what is logged, when, by whom, redaction, run continuity.

The only module that imports MLflow (inside functions: the import costs 2-3 s).

- Who: global rank 0 talks to MLflow. Other ranks get a `Tracking` that sends nothing but still
  carries the run id (broadcast from rank 0 at train start), so whichever rank writes the callback
  state into a sharded checkpoint writes the right id.
- When: `log_metrics` only appends to an in-memory buffer; a daemon thread ships it with `log_batch`
  (up to 1000 metrics a request) about once a second, retrying while the server is slow or down.
  `close` drains the buffer, then sets the run's final status.
- Which run: the run id travels in every checkpoint (a callback's `state_dict`). A fit that resumes
  from a checkpoint continues that run. Lightning restores callback state after `setup` and, for
  the DCP strategies, after `on_fit_start`, so the run is opened at `on_train_start`: the first
  moment the checkpoint's state is known for every strategy. Metrics logged earlier wait in the
  buffer.
- Once per run: the resolved config as dotted params (truncated past MLflow's limit, redacted), the
  config and overrides as YAML artifacts, the launch script, and tags that say where it ran. A
  resumed attempt adds only params the run does not have yet; changed values are listed in a tag
  and its own config goes under `attempts/<n>/`.
- Status: RUNNING while training, FINISHED at the end, FAILED on an exception, KILLED on SIGTERM
  (Lightning turns it into `SIGTERMException`) or SIGINT (`KeyboardInterrupt`).
"""

from __future__ import annotations

import atexit
import collections
import getpass
import json
import logging
import os
import posixpath
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities.exceptions import SIGTERMException

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from trainer.config import RunConfig, TrackingConfig

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DB_NAME = "mlflow.db"  # in the working directory, like MLflow 3's own default
# Kubernetes sets no job-name variable by itself; the rendered manifest passes the Job's
# `job-name` label in through the downward API under this name.
K8S_JOB_NAME_ENV = "K8S_JOB_NAME"
AWS_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

PROBE_TIMEOUT_S = 5.0  # an unreachable server costs at most this at start
SEND_INTERVAL_S = 1.0
RETRY_MAX_S = 30.0
CHECKPOINT_FLUSH_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 60.0  # SLURM's and Kubernetes' default grace before SIGKILL is 30 s
MAX_BUFFERED_METRICS = 1_000_000  # about 100 MB; past it the oldest points go

REDACTED = "***"
TRUNCATED = "...[truncated; full value in config/resolved.yaml]"
STATUSES = ("FINISHED", "FAILED", "KILLED")
_SECRET_WORDS = {"key", "keys", "secret", "token", "password", "passwd", "credential",
                 "credentials", "apikey"}
_SECRET_STEMS = ("secret", "password", "credential")


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached at start (raised only with fail_on_unreachable)."""


@dataclass(frozen=True)
class SweepInfo:
    """The Hydra multirun a job belongs to: one parent run per `sweep_dir`, one child per job."""

    sweep_dir: str
    job_num: int


# ---------------------------------------------------------------------------------------------
# Redaction


def looks_secret(key: str) -> bool:
    """True for a config key or variable name that names a secret (`storage_options.key`,
    `aws_secret_access_key`, `hfToken`), judged word by word so `tokenizer` or `keep_last` pass."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    return any(w in _SECRET_WORDS or w.startswith(_SECRET_STEMS) for w in words)


_ASSIGNMENT = re.compile(
    r"(?P<name>[A-Za-z_+~][\w.\-]*)(?P<sep>\s*[=:]\s*)(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;]+)")
_FLAG = re.compile(r"(?P<name>--[A-Za-z][\w.\-]*)(?P<sep>\s+)(?P<value>\"[^\"]*\"|'[^']*'|\S+)")


@dataclass(frozen=True)
class Redactor:
    """Hides secrets: values under secret-looking keys, and any AWS secret found in the
    environment wherever it appears."""

    secret_values: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Redactor:
        return cls(tuple(env[name] for name in AWS_SECRET_ENV if env.get(name)))

    def value(self, key: str, value: str) -> str:
        return REDACTED if looks_secret(key) else self._scrub(value)

    def tree(self, tree: Any) -> Any:
        """A copy of a config tree (dicts, lists, scalars) with every secret replaced."""
        if isinstance(tree, Mapping):
            return {k: REDACTED if looks_secret(str(k)) else self.tree(v) for k, v in tree.items()}
        if isinstance(tree, list | tuple):
            return [self.tree(v) for v in tree]
        return self._scrub(tree) if isinstance(tree, str) else tree

    def text(self, text: str) -> str:
        """Free text (a launch script, an override): `name=value`, `name: value` and
        `--name value` with a secret-looking name lose their value."""

        def hide(match: re.Match) -> str:
            if not looks_secret(match["name"]):
                return match[0]
            return f"{match['name']}{match['sep']}{REDACTED}"

        return self._scrub(_FLAG.sub(hide, _ASSIGNMENT.sub(hide, text)))

    def _scrub(self, text: str) -> str:
        for secret in self.secret_values:
            text = text.replace(secret, REDACTED)
        return text


def redact_uri(uri: str) -> str:
    """The URI without a user:password part, for messages and the UI hint."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.password and not parts.username:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# ---------------------------------------------------------------------------------------------
# What is logged once per run


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; lists and empty mappings stay leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def param_text(value: Any, limit: int) -> str:
    """A config value as it would read in YAML (`null`, `true`, `[1, 2]`), cut to `limit`."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATED)] + TRUNCATED


def config_params(resolved: Mapping[str, Any], redactor: Redactor) -> dict[str, str]:
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    params = {}
    for key, value in flatten(resolved).items():
        if len(key) > MAX_ENTITY_KEY_LENGTH:
            log.warning("config key %s... is longer than MLflow allows; it is only in the artifact",
                        key[:80])
            continue
        params[key] = redactor.value(key, param_text(value, MAX_PARAM_VAL_LENGTH))
    return params


def git_tags(repo: Path = REPO_DIR) -> dict[str, str]:
    """The commit the code runs from and whether the work tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {}
    # mlflow.source.git.commit is the tag the MLflow UI shows as the run's source version
    return {"mlflow.source.git.commit": commit, "git.commit": commit,
            "git.dirty": str(dirty).lower()}


def job_tags(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Scheduler identities: where to look when a run needs explaining."""
    tags = {}
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        tags["slurm.job_id"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    elif env.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = env["SLURM_JOB_ID"]
    for tag, name in (("slurm.restart_count", "SLURM_RESTART_COUNT"),
                      ("k8s.job_name", K8S_JOB_NAME_ENV),
                      ("torchrun.restart_count", "TORCHELASTIC_RESTART_COUNT")):
        if env.get(name):
            tags[tag] = env[name]
    return tags


def source_tags(argv: list[str] | None = None, env: Mapping[str, str] = os.environ
                ) -> dict[str, str]:
    """The program that ran (`python -m trainer`), without its arguments (they are in the
    overrides artifact), and whether a scheduler started it: the UI's "Source"."""
    argv = list(argv if argv is not None else getattr(sys, "orig_argv", sys.argv))
    program = argv[: argv.index("-m") + 2] if "-m" in argv else argv[:2]
    name = " ".join([Path(program[0]).name, *program[1:]]) if program else "python"
    scheduled = any(env.get(v) for v in ("SLURM_JOB_ID", K8S_JOB_NAME_ENV))
    return {"mlflow.source.name": name, "mlflow.source.type": "JOB" if scheduled else "LOCAL"}


def mesh_text(mesh_shape: Mapping[str, int]) -> str:
    """`2x4x8 (dp_replicate x dp_shard x tp)`: the shape, then what each factor is."""
    return f"{'x'.join(map(str, mesh_shape.values()))} ({' x '.join(mesh_shape)})"


def run_tags(run: RunConfig, mesh_shape: Mapping[str, int],
             env: Mapping[str, str] = os.environ) -> dict[str, str]:
    tags = {
        "hardware": run.hardware.name,
        "instance_type": run.hardware.instance_type,
        "world_size": str(run.world_size),
        "mesh": mesh_text(mesh_shape),
        "model": run.model.name,
        "mlflow.user": getpass.getuser(),
    }
    if not run.uses_reference_model:
        tags["model.target"] = run.model._target_
    return {**tags, **source_tags(env=env), **git_tags(), **job_tags(env)}


def default_run_name(run: RunConfig, sweep: SweepInfo | None) -> str:
    name = run.tracking.run_name or f"{run.model.name}-{run.hardware.name}-{run.world_size}r"
    return f"{name}-job{sweep.job_num}" if sweep else name


@dataclass
class RunRecord:
    """Everything logged once per attempt, already redacted."""

    name: str
    params: dict[str, str]
    tags: dict[str, str]
    artifacts: dict[str, str]  # path inside the run's artifacts -> text

    @classmethod
    def build(cls, run: RunConfig, *, resolved_config: Mapping[str, Any], overrides: list[str],
              mesh_shape: Mapping[str, int], sweep: SweepInfo | None,
              launch_artifact: tuple[str, str] | None, redactor: Redactor) -> RunRecord:
        artifacts = {
            "config/resolved.yaml": yaml.safe_dump(redactor.tree(dict(resolved_config)),
                                                   sort_keys=False),
            "config/overrides.yaml": yaml.safe_dump([redactor.text(o) for o in overrides]),
        }
        if launch_artifact:
            file_name, text = launch_artifact
            artifacts[f"launch/{file_name}"] = redactor.text(text)
        tags = {key: redactor.value(key, value)
                for key, value in run_tags(run, mesh_shape).items()}
        return cls(default_run_name(run, sweep), config_params(resolved_config, redactor), tags,
                   artifacts)


# ---------------------------------------------------------------------------------------------
# The sender: off the training thread


def _is_permanent(exc: BaseException) -> bool:
    """A request the server rejected (4xx) fails the same way if retried; anything else (refused
    connection, timeout, 5xx, a locked SQLite file) may pass later."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and 400 <= exc.get_http_status_code() < 500


class Sender:
    """A buffer of metric points and one-off writes, shipped to one run by a daemon thread.

    `add_metrics` and `add_job` never block on the network. Jobs (params, tags, artifacts) go
    before metrics; the final job (the run's end status) goes once both are empty.
    """

    def __init__(self, client: MlflowClient, where: str):
        self._client, self._where = client, where
        self._metrics: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._jobs: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self._final: Callable[[], None] | None = None
        self._run_id: str | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._failing = False
        self._in_flight = 0
        self.sent = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._metrics) + len(self._jobs) + self._in_flight

    def add_metrics(self, points: Iterable[tuple[str, float, int, int]]) -> None:
        self._metrics.extend(points)
        overflow = len(self._metrics) - MAX_BUFFERED_METRICS
        if overflow > 0:
            if not self.dropped:
                log.warning("MLflow: %d metric points are waiting for %s; dropping the oldest",
                            MAX_BUFFERED_METRICS, self._where)
            for _ in range(overflow):
                self._metrics.popleft()
            self.dropped += overflow

    def add_job(self, what: str, job: Callable[[], None]) -> None:
        self._jobs.append((what, job))
        self._wake.set()

    def start(self, run_id: str) -> None:
        self._run_id = run_id
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything buffered so far is sent; False if `timeout_s` ran out first."""
        if self._thread is None:
            return self.pending == 0
        self._wake.set()
        with self._idle:
            return self._idle.wait_for(lambda: self.pending == 0, timeout_s)

    def close(self, final: Callable[[], None], timeout_s: float) -> bool:
        """Send everything, then run `final`; False (and the thread gives up) if that took more
        than `timeout_s`."""
        self._final = final
        self._closing.set()
        self._wake.set()
        if self._thread is None:
            return False
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abandon.set()
            return False
        return True

    def _loop(self) -> None:
        delay = 0.0
        while not self._abandon.is_set():
            if delay:
                self._abandon.wait(delay)
            else:
                self._wake.wait(SEND_INTERVAL_S)
            self._wake.clear()
            try:
                self._ship()
                if self._closing.is_set() and self._final is not None:
                    self._attempt("the end status", self._final)
                    return
            except Exception as exc:
                delay = min(max(2 * delay, 1.0), RETRY_MAX_S)
                self._report_failure(exc)
                continue
            delay = 0.0
            self._report_recovery()

    def _ship(self) -> None:
        while self._jobs and not self._abandon.is_set():
            what, job = self._jobs[0]
            self._attempt(what, job)
            self._jobs.popleft()
        while self._metrics and not self._abandon.is_set():
            self._ship_metric_batch()
        with self._idle:
            self._idle.notify_all()

    def _ship_metric_batch(self) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        batch = []
        while self._metrics and len(batch) < MAX_METRICS_PER_BATCH:
            batch.append(self._metrics.popleft())
        self._in_flight = len(batch)
        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in batch]
        try:
            if self._attempt("metrics",
                             lambda: self._client.log_batch(self._run_id, metrics=metrics)):
                self.sent += len(batch)
            else:
                self.dropped += len(batch)
        except Exception:
            self._metrics.extendleft(reversed(batch))
            raise
        finally:
            self._in_flight = 0

    def _attempt(self, what: str, call: Callable[[], Any]) -> bool:
        """True when `call` got through, False when the server rejected it for good; raises
        what may pass on a retry."""
        try:
            call()
        except Exception as exc:
            if not _is_permanent(exc):
                raise
            log.warning("MLflow rejected %s for run %s, not retrying: %s", what, self._run_id, exc)
            return False
        return True

    def _report_failure(self, exc: Exception) -> None:
        if not self._failing:
            log.warning("MLflow at %s is not answering (%s); buffering %d items and retrying",
                        self._where, str(exc).splitlines()[0][:200], self.pending)
        self._failing = True

    def _report_recovery(self) -> None:
        if self._failing:
            log.info("MLflow at %s answers again", self._where)
        self._failing = False


# ---------------------------------------------------------------------------------------------
# Tracking: the object the trainer holds


def status_for(exception: BaseException | None) -> str:
    """The MLflow end status of an attempt that ended with `exception` (None: it finished)."""
    if exception is None:
        return "FINISHED"
    if isinstance(exception, SIGTERMException | KeyboardInterrupt):
        return "KILLED"
    return "FAILED"


def resolve_uri(configured: str | None, env: Mapping[str, str] = os.environ) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else the SQLite file in the working directory."""
    local = f"sqlite:///{Path.cwd() / DEFAULT_DB_NAME}"
    return configured or env.get("MLFLOW_TRACKING_URI") or local


def _probe_http(uri: str) -> None:
    """Any HTTP answer from /health (even 401) means a server is there."""
    try:
        health = f"{redact_uri(uri).rstrip('/')}/health"
        urllib.request.urlopen(health, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        raise TrackingUnavailable(f"{redact_uri(uri)}/health: {exc}") from exc


# The sender retries on its own schedule. MLflow's defaults (7 retries, backoff factor 2, 120 s
# timeout) hold one request for minutes after the server is back, longer than a job's grace period
# at shutdown. Settings the user exported win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def connect(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client for `uri` and the id of `experiment` there (created when new)."""
    if uri.startswith(("http://", "https://")):
        _probe_http(uri)
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return client, found.experiment_id
        try:
            return client, client.create_experiment(experiment)
        except MlflowException:  # another job created it a moment ago
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return client, found.experiment_id
    except Exception as exc:
        raise TrackingUnavailable(f"{redact_uri(uri)}: {exc}") from exc


class Tracking:
    """One attempt's link to its MLflow run. See the module docstring for the life cycle."""

    def __init__(self, settings: TrackingConfig, uri: str, *, run_dir: Path,
                 client: MlflowClient | None = None, experiment_id: str | None = None,
                 record: RunRecord | None = None, sweep: SweepInfo | None = None):
        self.settings, self.uri, self.run_dir = settings, uri, run_dir
        self.experiment_id = experiment_id
        self.run_id: str | None = None
        self.resumed_from: str | None = None  # the run id a loaded checkpoint carried
        self._client, self._record, self._sweep = client, record, sweep
        self._sender = Sender(client, redact_uri(uri)) if client is not None else None
        self._every = settings.log_every_n_steps
        self._keys: dict[str, str] = {}
        self._opened = self._closed = False
        self._lock = threading.Lock()
        self._parent_id: str | None = None
        self._monitor: Any = None
        self._last_step = 0
        self._kept_step: int | None = None
        self.logger = TrackingLogger(self)
        self.callbacks: list[pl.Callback] = [RunContinuity(self)]
        if self.sends:
            atexit.register(self._close_at_exit)

    @property
    def sends(self) -> bool:
        """True on the rank that talks to MLflow, while its run is not closed."""
        return self._sender is not None and not self._closed

    @property
    def run_name(self) -> str | None:
        return self._record.name if self._record else self.settings.run_name

    @property
    def ui_hint(self) -> str:
        where = redact_uri(self.uri)
        page = f"#/experiments/{self.experiment_id}"
        if self.run_id:
            page += f"/runs/{self.run_id}"
        if where.startswith(("http://", "https://")):
            return f"{where.rstrip('/')}/{page}"
        return f"mlflow ui --backend-store-uri {where}  (then open {page})"

    # -- the hot path ------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer one step's numbers (thinned to `tracking.log_every_n_steps`)."""
        step = self._last_step if step is None else step
        self._last_step = step
        if not self.sends or self._thinned(step):
            return
        now = int(time.time() * 1000)
        self._sender.add_metrics(  # type: ignore[union-attr]
            (self._key(k), float(v), now, step) for k, v in metrics.items())

    def _thinned(self, step: int) -> bool:
        """Keep a step only `log_every_n_steps` after the last one kept (several calls for the
        one step all pass), whatever cadence the trainer logs at."""
        if self._kept_step is not None and 0 < step - self._kept_step < self._every:
            return True
        self._kept_step = step
        return False

    def log_checkpoint(self, step: int, url: str, seconds: float, nbytes: int) -> None:
        """A committed checkpoint: its timing and size as metrics, its URL as a tag (no bytes)."""
        if not self.sends:
            return
        now = int(time.time() * 1000)
        self._sender.add_metrics([  # type: ignore[union-attr]
            ("checkpoint/step", float(step), now, step),
            ("checkpoint/seconds", float(seconds), now, step),
            ("checkpoint/bytes", float(nbytes), now, step),
        ])
        tags = {"checkpoint.latest_url": url, "checkpoint.latest_step": str(step)}
        self._sender.add_job("checkpoint tags", lambda: self._set_tags(tags))  # type: ignore
        # A checkpoint is where a killed job resumes: once it is committed, the metrics of the
        # steps before it must be in MLflow too, or a SIGKILL would lose them for good. Waiting
        # here costs one round trip per checkpoint, never per step.
        if not self.flush(CHECKPOINT_FLUSH_TIMEOUT_S):
            log.warning("MLflow has not taken the metrics before checkpoint step %d yet; "
                        "they stay buffered", step)

    def log_checkpoint_failure(self, step: int, url: str, reason: str) -> None:
        """A save that did not commit: a metric at its step and the reason as a tag."""
        if not self.sends:
            return
        now = int(time.time() * 1000)
        self._sender.add_metrics([("checkpoint/failed", 1.0, now, step)])  # type: ignore
        tags = {"checkpoint.last_failure": f"step {step} at {url}: {reason}"[:4000]}
        self._sender.add_job("checkpoint tags", lambda: self._set_tags(tags))  # type: ignore

    def _key(self, key: str) -> str:
        """MLflow's metric name rules, checked once per name."""
        known = self._keys.get(key)
        if known is None:
            known = re.sub(r"[^/\w.\- :]", "_", key)
            known = posixpath.normpath(known).lstrip("/.") or "metric"
            if known != key:
                log.warning("metric %r is logged to MLflow as %r", key, known)
            self._keys[key] = known
        return known

    # -- opening: create or continue ---------------------------------------------------------

    def continue_run(self, run_id: str | None) -> None:
        """Called with the run id from a checkpoint before the run is opened."""
        self.resumed_from = run_id
        if not self._opened:
            self.run_id = run_id

    def open(self) -> str | None:
        """Create the run, or continue the one a checkpoint named; ship the once-per-run record.
        Idempotent. Returns the run id (None where no run could be reached)."""
        with self._lock:
            if self._opened or not self.sends:
                return self.run_id
            self._opened = True
            try:
                self._open()
            except Exception as exc:
                if self.settings.fail_on_unreachable:
                    raise TrackingUnavailable(f"{redact_uri(self.uri)}: {exc}") from exc
                log.warning("MLflow tracking is off for this attempt: opening a run at %s failed: "
                            "%s", redact_uri(self.uri), exc)
                self._sender = None
        return self.run_id

    def _open(self) -> None:
        assert self._client is not None and self._record is not None
        existing = self._find_run(self.resumed_from) if self.resumed_from else None
        if self._sweep:
            self._parent_id = self._sweep_parent(self._sweep)
        if existing is None:
            run = self._create_run()
            attempt, params, artifacts = 1, self._record.params, self._record.artifacts
        else:
            run = existing
            self._client.update_run(run.info.run_id, status="RUNNING")
            attempt = int(run.data.tags.get("attempt", "1")) + 1
            params, changed = self._new_params(run.data.params)
            artifacts = {f"attempts/{attempt}/{Path(p).name}": text
                         for p, text in self._record.artifacts.items()}
            if changed:
                self._record.tags[f"attempt.{attempt}.changed_params"] = ", ".join(changed)[:4000]
        self.run_id = run.info.run_id
        tags = {**self._record.tags, "attempt": str(attempt)}
        self._ship_record(params, tags, artifacts)
        self._write_run_file()
        self._start_system_metrics(resumed=existing is not None)
        self._sender.start(self.run_id)  # type: ignore[union-attr]
        log.info("MLflow run %s (attempt %d): %s", self.run_id, attempt, self.ui_hint)

    def _find_run(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)  # type: ignore[union-attr]
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s from the checkpoint is not in %s (or was deleted); "
                        "starting a new run", run_id, redact_uri(self.uri))
            return None
        return run

    def _create_run(self) -> Any:
        tags = dict(self._record.tags)  # type: ignore[union-attr]
        if self.resumed_from:
            tags["resumed_from_run"] = self.resumed_from
        if self._parent_id:
            tags["mlflow.parentRunId"] = self._parent_id
        return self._client.create_run(self.experiment_id, run_name=self._record.name,  # type: ignore
                                       tags=tags)

    def _new_params(self, logged: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        """Params the run lacks, and the keys whose value changed (MLflow params are immutable)."""
        params = self._record.params  # type: ignore[union-attr]
        new = {k: v for k, v in params.items() if k not in logged}
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        return new, changed

    def _sweep_parent(self, sweep: SweepInfo) -> str:
        """The parent run of a multirun, made by whichever job gets there first."""
        client = self._client
        assert client is not None
        query = f"tags.`sweep.dir` = '{sweep.sweep_dir}' and tags.`sweep.parent` = 'true'"

        def oldest() -> list:
            return client.search_runs([self.experiment_id], query, max_results=1,
                                      order_by=["attributes.start_time ASC"])

        found = oldest()
        if found:
            parent_id = found[0].info.run_id
        else:
            # Hydra's sweep dirs end in <date>/<time>: enough to tell sweeps apart in the UI
            name = "sweep " + "/".join(Path(sweep.sweep_dir).parts[-2:])
            mine = client.create_run(self.experiment_id, run_name=name,
                                     tags={"sweep.dir": sweep.sweep_dir, "sweep.parent": "true"})
            # jobs that start together may each make one: the oldest stays, the others go
            parent_id = oldest()[0].info.run_id
            if parent_id != mine.info.run_id:
                client.delete_run(mine.info.run_id)
        client.update_run(parent_id, status="RUNNING")
        self._record.tags.update({"sweep.dir": sweep.sweep_dir,  # type: ignore[union-attr]
                                  "sweep.job": str(sweep.job_num)})
        return parent_id

    def _ship_record(self, params: Mapping[str, str], tags: Mapping[str, str],
                     artifacts: Mapping[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        items = sorted(params.items())
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = [Param(k, v) for k, v in items[i: i + MAX_PARAMS_TAGS_PER_BATCH]]
            self._sender.add_job(  # type: ignore[union-attr]
                "params", lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk))
        self._sender.add_job("tags", lambda: self._set_tags(tags))  # type: ignore[union-attr]
        for path, text in artifacts.items():
            self._sender.add_job(  # type: ignore[union-attr]
                path, lambda p=path, t=text: self._client.log_text(self.run_id, t, p))

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

        items = [RunTag(k, v[:MAX_TAG_VAL_LENGTH]) for k, v in sorted(tags.items())]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i: i + MAX_PARAMS_TAGS_PER_BATCH])

    def _write_run_file(self) -> None:
        """`mlflow_run.json` in the run directory: the run a person or a launcher looks for."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "mlflow_run.json").write_text(json.dumps({
            "tracking_uri": redact_uri(self.uri), "experiment_id": self.experiment_id,
            "run_id": self.run_id, "ui": self.ui_hint}, indent=2) + "\n")

    def _start_system_metrics(self, resumed: bool) -> None:
        if not self.settings.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed,
                                                 tracking_uri=self.uri)
        except ImportError as exc:  # psutil (CPU, memory) and pynvml (GPU) are optional in MLflow
            log.warning("MLflow system metrics are off: %s (pip install psutil nvidia-ml-py)", exc)
            return
        self._monitor.start()

    # -- closing -----------------------------------------------------------------------------

    def flush(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Block until what was logged so far is in MLflow (or `timeout_s` passes)."""
        if not self.sends or not self._opened:
            return True
        return self._sender.flush(timeout_s)  # type: ignore[union-attr]

    def close(self, status: str, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """End the attempt: send what is buffered, then mark the run `status`. The first call
        counts; later ones (Lightning's finalize after the callback, the trainer's own) do
        nothing. An attempt that ended before training started is recorded too."""
        if status not in STATUSES:
            raise ValueError(f"status={status!r}: allowed: {', '.join(STATUSES)}")
        with self._lock:
            if self._closed:
                return
        try:
            self.open()
        except TrackingUnavailable as exc:  # already failing: keep the first error on top
            log.warning("%s", exc)
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._close_at_exit)
        if self._sender is None:
            return
        sender = self._sender
        if not sender.close(lambda: self._terminate(status), timeout_s):
            log.warning("MLflow: %d items not sent to %s after %.0f s; run %s may stay RUNNING",
                        sender.pending, redact_uri(self.uri), timeout_s, self.run_id)
        elif sender.dropped:
            log.warning("MLflow: %d metric points were dropped for run %s", sender.dropped,
                        self.run_id)

    def _terminate(self, status: str) -> None:
        if self._monitor is not None:
            self._monitor.finish()
        self._client.set_terminated(self.run_id, status)  # type: ignore[union-attr]
        if self._parent_id:
            self._end_parent(status)

    def _end_parent(self, status: str) -> None:
        """A sweep's parent shows FAILED once any job failed, else the latest job's status."""
        client = self._client
        parent = client.get_run(self._parent_id)  # type: ignore[union-attr]
        if parent.info.status != "FAILED":
            client.set_terminated(self._parent_id, status)  # type: ignore[union-attr]

    def _close_at_exit(self) -> None:
        """The interpreter is exiting with the run still open: an exception nobody caught, or a
        trainer that never called close."""
        uncaught = getattr(sys, "last_value", None)
        self.close(status_for(uncaught) if uncaught else "FAILED")


# ---------------------------------------------------------------------------------------------
# Lightning glue


class TrackingLogger(Logger):
    """The Lightning face of `Tracking`: metrics go to its buffer, nothing else is sent."""

    def __init__(self, tracking: Tracking):
        super().__init__()
        self._tracking = tracking

    @property
    def name(self) -> str:
        return self._tracking.settings.experiment

    @property
    def version(self) -> str | None:
        # stable across restarts (ModelCheckpoint may build its directory from it)
        return self._tracking.run_name

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._tracking.log_metrics(metrics, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Ignored: the resolved config is the run's params; the module's hparams repeat it and
        would collide with the logged values when a run resumes."""

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Nothing is uploaded: checkpoints are reported by `Tracking.log_checkpoint`."""

    def finalize(self, status: str) -> None:
        """Lightning's end of fit: "success" and "failed" end the run; "finished" (SLURM's requeue
        signal, training goes on until SIGTERM) only flushes."""
        ending = {"success": "FINISHED", "failed": "FAILED"}.get(status)
        if ending:
            self._tracking.close(ending)
        else:
            self._tracking.flush()


class RunContinuity(pl.Callback):
    """Keeps one MLflow run across restarts: the run id goes into every checkpoint and comes back
    out of the one a fit resumes from. Also ends the run when the fit raises."""

    def __init__(self, tracking: Tracking):
        self._tracking = tracking

    @property
    def state_key(self) -> str:
        return "mlflow_run"

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self._tracking.run_id or self._tracking.resumed_from,
                "experiment_id": self._tracking.experiment_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tracking.continue_run(state_dict.get("run_id"))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_id = self._tracking.open()
        # every rank records the id: with DCP, any rank may write the callback state
        self._tracking.run_id = trainer.strategy.broadcast(run_id, src=0)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._tracking.close(status_for(exception))


def setup(run: RunConfig, *, run_dir: Path, resolved_config: Mapping[str, Any],
          overrides: list[str], mesh_shape: Mapping[str, int], rank: int,
          sweep: SweepInfo | None = None,
          launch_artifact: tuple[str, str] | None = None) -> Tracking | None:
    """The tracking of one attempt; None when `tracking.backend` is none.

    On rank 0 this reaches the store (one warning and no tracking if it cannot, or
    `TrackingUnavailable` with `tracking.fail_on_unreachable`). Other ranks get a `Tracking` that
    sends nothing.
    """
    settings = run.tracking
    if settings.backend == "none":
        return None
    uri = resolve_uri(settings.uri)
    if rank != 0:
        return Tracking(settings, uri, run_dir=run_dir)
    try:
        client, experiment_id = connect(uri, settings.experiment)
    except TrackingUnavailable as exc:
        if settings.fail_on_unreachable:
            raise
        log.warning("MLflow tracking is off for this attempt: %s (training goes on; set "
                    "tracking.fail_on_unreachable=true to stop instead)", exc)
        return Tracking(settings, uri, run_dir=run_dir)
    record = RunRecord.build(run, resolved_config=resolved_config, overrides=overrides,
                             mesh_shape=mesh_shape, sweep=sweep, launch_artifact=launch_artifact,
                             redactor=Redactor.from_env())
    return Tracking(settings, uri, run_dir=run_dir, client=client, experiment_id=experiment_id,
                    record=record, sweep=sweep)
