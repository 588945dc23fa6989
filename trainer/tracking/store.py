"""Reaching the tracking store: where it is (`tracking.uri`, MLFLOW_TRACKING_URI or a local SQLite
file) and a client with the experiment's id, or `TrackingUnavailable`."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import KEY, ConfigError
from trainer.tracking.redact import redact_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_DB_NAME = "mlflow.db"  # in the working directory, like MLflow 3's own default
PROBE_TIMEOUT_S = 5.0  # an unreachable server costs at most this at start


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached at start (raised only with fail_on_unreachable)."""


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


def check_uri(uri: str, *, reachable: bool) -> None:
    """A ConfigError naming tracking.uri where MLflow could not use `uri`: a scheme MLflow has
    no store for (its own registry answers, plugins included), a SQLite file in a directory that
    does not exist, or, with `reachable` (tracking.fail_on_unreachable), a server that does not
    answer. A run that only warns about an unreachable server checks that at start instead."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    shown = redact_uri(uri)
    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        known = sorted(s for s in _tracking_store_registry._registry if s)
        raise ConfigError(KEY.tracking.uri, shown,
                          f"MLflow has no tracking store for this scheme; use one of "
                          f"{', '.join(f'{s}://' for s in known)} (or null: sqlite:///"
                          f"{DEFAULT_DB_NAME} here)") from None
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(KEY.tracking.uri, shown,
                              f"the directory {folder} of the SQLite file does not exist")
    if reachable and uri.startswith(("http://", "https://")):
        try:
            _probe_http(uri)
        except TrackingUnavailable as exc:
            raise ConfigError(KEY.tracking.uri, shown,
                              f"the server does not answer ({exc}) and "
                              f"{KEY.tracking.fail_on_unreachable}=true") from None


def connect(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client for `uri` and the id of `experiment` there (created when new)."""
    if uri.startswith(("http://", "https://")):
        _probe_http(uri)
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(tracking_uri=uri)
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
