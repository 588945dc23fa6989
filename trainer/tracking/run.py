"""One attempt's MLflow run: opened at train start (new, or continued from the run id a
checkpoint carried, or as a child of a sweep's parent), fed metrics through the sender, closed
once with the status `trainer.tracking.status` decides. `setup` builds it for a rank."""

from __future__ import annotations

import atexit
import json
import logging
import posixpath
import re
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import KEY
from trainer.tracking.record import RunRecord, SweepInfo
from trainer.tracking.redact import Redactor, redact_uri
from trainer.tracking.sender import Sender
from trainer.tracking.status import RUNNING, STATUSES, parent_status, status_at_exit
from trainer.tracking.store import TrackingUnavailable, connect, resolve_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from trainer.config import RunConfig, TrackingConfig

log = logging.getLogger(__name__)

CHECKPOINT_FLUSH_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 60.0  # SLURM's and Kubernetes' default grace before SIGKILL is 30 s


class Tracking:
    """One attempt's link to its MLflow run. `trainer.tracking`'s docstring tells its life cycle."""

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
            self._client.update_run(run.info.run_id, status=RUNNING)
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
        client.update_run(parent_id, status=RUNNING)
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
        """The sweep's parent run ends with the status `parent_status` gives it."""
        client = self._client
        parent = client.get_run(self._parent_id)  # type: ignore[union-attr]
        status = parent_status(parent.info.status, status)
        if status is not None:
            client.set_terminated(self._parent_id, status)  # type: ignore[union-attr]

    def _close_at_exit(self) -> None:
        """The interpreter is exiting with the run still open: an exception nobody caught, or a
        trainer that never called close."""
        self.close(status_at_exit(getattr(sys, "last_value", None)))


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
                    "%s=true to stop instead)", exc, KEY.tracking.fail_on_unreachable)
        return Tracking(settings, uri, run_dir=run_dir)
    record = RunRecord.build(run, resolved_config=resolved_config, overrides=overrides,
                             mesh_shape=mesh_shape, sweep=sweep, launch_artifact=launch_artifact,
                             redactor=Redactor.from_env())
    return Tracking(settings, uri, run_dir=run_dir, client=client, experiment_id=experiment_id,
                    record=record, sweep=sweep)
