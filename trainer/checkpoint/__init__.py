"""Checkpoints that survive the cluster: one DCP-over-fsspec `CheckpointIO` for every strategy,
async saves committed by a manifest with checksums, retention, resume on any mesh, export.

Public: `CheckpointIO`, `PeriodicCheckpoint` (its `save(trainer)` returns once committed),
`Retention`, the strategies that save through them (`SingleProcess`, `DataParallel`; the mesh's is
`trainer.mesh.MeshStrategy`), `checkpoint_dir`, `resume_path`, `check_destination`,
`config_hash`, `model_shape`, and the command line `python -m trainer.checkpoint list|export`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from trainer.checkpoint.callback import CheckpointFailed, PeriodicCheckpoint, trainer_state
from trainer.checkpoint.io import CheckpointIO, SaveResult
from trainer.checkpoint.manifest import (
    MANIFEST,
    Manifest,
    newest_committed,
    read_manifest,
    scan,
    step_name,
)
from trainer.checkpoint.retention import Retention
from trainer.checkpoint.storage import one_line, probe
from trainer.checkpoint.strategies import DataParallel, SavesThroughDcp, SingleProcess
from trainer.config import CheckpointConfig, ConfigError, RunConfig
from trainer.models.registry import family_of

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST", "CheckpointFailed", "CheckpointIO", "DataParallel", "Manifest",
    "PeriodicCheckpoint", "Retention", "SaveResult", "SavesThroughDcp", "SingleProcess",
    "check_destination", "checkpoint_dir", "config_hash", "latest_checkpoint", "model_shape",
    "read_manifest", "resume_path", "scan", "step_name", "trainer_state",
]


def checkpoint_dir(cfg: CheckpointConfig, run_dir: Path) -> str:
    """`checkpoint.dir` as a URL; a relative path is under the run's output directory."""
    if "://" in cfg.dir or Path(cfg.dir).is_absolute():
        return cfg.dir
    return str((run_dir / cfg.dir).resolve())


def check_destination(cfg: CheckpointConfig, run_dir: Path) -> None:
    """Write and delete a small object where checkpoints go; ConfigError naming checkpoint.dir
    if that fails, so a run that could never save stops before its first step."""
    directory = checkpoint_dir(cfg, run_dir)
    try:
        probe(directory, cfg.storage_options)
    except Exception as exc:
        raise ConfigError("checkpoint.dir", cfg.dir,
                          f"cannot write a test object there ({one_line(exc)}); give a path or "
                          "fsspec URL this process can write, with the endpoint and credentials "
                          "in checkpoint.storage_options or the standard AWS sources") from exc


def latest_checkpoint(directory: str, storage_options: dict | None = None) -> str | None:
    """The newest committed checkpoint under `directory` (checksums not yet checked), or None."""
    found = newest_committed(directory, storage_options)
    return found.url if found else None


def resume_path(cfg: CheckpointConfig, run_dir: Path) -> str | None:
    """What `checkpoint.resume` asks to resume from: nothing, the newest committed checkpoint (its
    checksums are checked at load, with fallback to older ones), or a given committed URL."""
    if cfg.resume in (None, "", "none"):
        return None
    if cfg.resume == "last":
        directory = checkpoint_dir(cfg, run_dir)
        found = latest_checkpoint(directory, cfg.storage_options)
        if found is None:
            log.info("checkpoint.resume=last: no committed checkpoint under %s yet; starting "
                     "fresh", directory)
        return found
    try:
        committed = read_manifest(cfg.resume, cfg.storage_options) is not None
    except Exception as exc:
        raise ConfigError("checkpoint.resume", cfg.resume,
                          f"cannot be read ({one_line(exc)})") from exc
    if not committed:
        raise ConfigError("checkpoint.resume", cfg.resume,
                          f"has no {MANIFEST}: not a committed checkpoint (a save that did not "
                          "finish, or not a checkpoint); `python -m trainer.checkpoint list DIR` "
                          "shows the committed ones")
    return cfg.resume


def config_hash(run: RunConfig) -> str:
    """A short hash of what makes two runs the same training: model, optimizer, seed, the data's
    path and shapes (not where checkpoints go, nor the mesh: a checkpoint may resume on another)."""
    data = dataclasses.asdict(run.data)
    for per_rank in ("storage_options", "micro_batch_size", "num_workers"):  # change with a mesh
        data.pop(per_rank, None)
    model = dataclasses.asdict(run.model)
    model.pop("storage_options", None)  # where weights come from, not what they are
    what: dict[str, Any] = {"model": model,
                            "optim": dataclasses.asdict(run.optim), "data": data,
                            "seed": run.seed}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_shape(run: RunConfig) -> dict[str, Any] | None:
    """The model's family and shape keys, kept in each manifest so `export` needs no config
    (None for a user's own module)."""
    if not run.uses_family_model:
        return None
    fam = family_of(run.model)
    return {"family": fam.name, **{key: getattr(run.model, key) for key in fam.shape_keys()}}
