"""A hardware comparison as one finished MLflow run (`python -m trainer.plan compare`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.tracking.redact import redact_uri
from trainer.tracking.store import TrackingUnavailable, connect, resolve_uri

if TYPE_CHECKING:
    from trainer.config import TrackingConfig


def log_comparison(settings: TrackingConfig, run_name: str, params: Mapping[str, str],
                   metrics: Mapping[str, float], artifacts: Iterable[Path]) -> tuple[str, str]:
    """One finished MLflow run for a hardware comparison (`python -m trainer.plan compare`): its
    request as params, one metric per figure, its table, JSON and chart as artifacts. Self-
    contained (no Tracking object: nothing trains). Returns the run id and where to see it;
    raises TrackingUnavailable when the store cannot be reached."""
    from mlflow.entities import Metric, Param

    uri = resolve_uri(settings.uri)
    client, experiment_id = connect(uri, settings.experiment)
    try:
        run_id = client.create_run(experiment_id, run_name=run_name,
                                   tags={"ultramesh.kind": "hardware-comparison"}).info.run_id
        now = int(time.time() * 1000)
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                         metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")
    except Exception as exc:
        raise TrackingUnavailable(f"{redact_uri(uri)}: {exc}") from exc
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    where = redact_uri(uri)
    if where.startswith(("http://", "https://")):
        return run_id, f"{where.rstrip('/')}/{page}"
    return run_id, f"mlflow ui --backend-store-uri {where}  (then open {page})"
