"""The sender: metric points and one-off writes shipped to MLflow by a daemon thread, off the
training thread, retrying while the server is slow or down."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

SEND_INTERVAL_S = 1.0
RETRY_MAX_S = 30.0
MAX_BUFFERED_METRICS = 1_000_000  # about 100 MB; past it the oldest points go


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
