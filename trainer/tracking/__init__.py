"""MLflow experiment tracking: what is logged, when, by whom, redaction, run continuity.

The only package that imports MLflow (inside functions: the import costs 2-3 s). Its modules:
`redact` (secrets), `record` (what is logged once per run), `sender` (the background thread),
`store` (reaching the server), `status` (how an attempt ends), `run` (`Tracking`, one attempt's
run, and `setup`), `lightning` (the logger and callback the Trainer holds).

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
- Status: RUNNING while training, then the end status `status.py` decides: FINISHED at the end,
  FAILED on an exception, KILLED on SIGTERM (Lightning turns it into `SIGTERMException`) or
  SIGINT (`KeyboardInterrupt`).
"""


from trainer.tracking.comparison import log_comparison
from trainer.tracking.lightning import RunContinuity, TrackingLogger
from trainer.tracking.record import (
    K8S_JOB_NAME_ENV,
    RunRecord,
    SweepInfo,
    config_params,
    flatten,
    git_tags,
    job_tags,
    mesh_text,
    param_text,
    run_tags,
    source_tags,
)
from trainer.tracking.redact import REDACTED, Redactor, looks_secret, redact_uri
from trainer.tracking.run import Tracking, setup
from trainer.tracking.sender import Sender
from trainer.tracking.status import STATUSES, status_for
from trainer.tracking.store import TrackingUnavailable, connect, resolve_uri

__all__ = [
    "K8S_JOB_NAME_ENV",
    "REDACTED",
    "STATUSES",
    "Redactor",
    "RunContinuity",
    "RunRecord",
    "Sender",
    "SweepInfo",
    "Tracking",
    "TrackingLogger",
    "TrackingUnavailable",
    "config_params",
    "connect",
    "flatten",
    "git_tags",
    "job_tags",
    "log_comparison",
    "looks_secret",
    "mesh_text",
    "param_text",
    "redact_uri",
    "resolve_uri",
    "run_tags",
    "setup",
    "source_tags",
    "status_for",
]
