"""Checkpoints through fsspec URLs: save every N steps from inside the loop, commit, prune, resume.

A checkpoint exists only once committed: the `latest` marker beside them is rewritten after the
checkpoint is completely written, so a run killed mid-save resumes from the previous one. Saving
happens inside the training loop (not after `fit` returns): a checkpoint taken after the loop ends
records the epoch as finished, and a resumed sampler would then start the next epoch's order.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytorch_lightning as pl

from trainer.config import CheckpointConfig

log = logging.getLogger(__name__)
LATEST = "latest"
OnSaved = Callable[[int, str, float, int], None]  # step, url, seconds, bytes


def checkpoint_dir(cfg: CheckpointConfig, run_dir: Path) -> str:
    """`checkpoint.dir` as a URL; a relative path is under the run's output directory."""
    if "://" in cfg.dir or Path(cfg.dir).is_absolute():
        return cfg.dir
    return str((run_dir / cfg.dir).resolve())


def step_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def latest_checkpoint(directory: str, storage_options: dict | None = None) -> str | None:
    """The newest committed checkpoint under `directory`, or None."""
    fs, root = fsspec.core.url_to_fs(directory, **(storage_options or {}))
    marker = posixpath.join(root, LATEST)
    if not fs.exists(marker):
        return None
    name = fs.cat_file(marker).decode().strip()
    path = posixpath.join(root, name)
    if not fs.exists(path):
        log.warning("%s names %s, which is missing; starting fresh", marker, name)
        return None
    return _url(directory, path)


def resume_path(cfg: CheckpointConfig, run_dir: Path) -> str | None:
    """What `checkpoint.resume` asks to resume from: nothing, the newest, or a given URL."""
    if cfg.resume in (None, "", "none"):
        return None
    if cfg.resume == "last":
        found = latest_checkpoint(checkpoint_dir(cfg, run_dir), cfg.storage_options)
        if found is None:
            log.info("checkpoint.resume=last: no checkpoint under %s yet; starting fresh",
                     checkpoint_dir(cfg, run_dir))
        return found
    return cfg.resume


class PeriodicCheckpoint(pl.Callback):
    def __init__(self, directory: str, every_n_steps: int, keep_last: int,
                 storage_options: dict | None = None, on_saved: OnSaved | None = None):
        self.directory = directory
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.storage_options = storage_options or {}
        self.on_saved = on_saved
        self.last_saved: str | None = None
        self._step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._step:  # still accumulating gradients for this step
            return
        self._step = step
        at_end = trainer.max_steps is not None and step >= trainer.max_steps
        if at_end or (self.every_n_steps and step % self.every_n_steps == 0):
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> str:
        fs, root = fsspec.core.url_to_fs(self.directory, **self.storage_options)
        name = step_name(trainer.global_step)
        path = posixpath.join(root, name)
        url = _url(self.directory, path)
        start = time.perf_counter()
        if trainer.is_global_zero:
            fs.makedirs(root, exist_ok=True)
        # Every rank: sharded strategies write their own shards.
        trainer.save_checkpoint(url, weights_only=False)
        seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            fs.pipe_file(posixpath.join(root, LATEST), name.encode())  # the commit
            nbytes = fs.du(path) if fs.isdir(path) else fs.size(path)
            self._prune(fs, root)
            if self.on_saved is not None:
                self.on_saved(trainer.global_step, url, seconds, nbytes)
            log.info("checkpoint step %d: %s (%.1f MiB, %.2f s)", trainer.global_step, url,
                     nbytes / 2**20, seconds)
        trainer.strategy.barrier("ultramesh.checkpoint.commit")
        self.last_saved = url
        return url

    def _prune(self, fs, root: str) -> None:
        names = sorted(n for n in (posixpath.basename(p) for p in fs.ls(root, detail=False))
                       if n.startswith("step-") and n.endswith(".ckpt"))
        for name in names[: -self.keep_last]:
            fs.rm(posixpath.join(root, name), recursive=True)


def _url(directory: str, path: str) -> str:
    """`path` with the protocol of `directory` put back (fsspec strips it)."""
    protocol, sep, _ = directory.partition("://")
    return f"{protocol}://{path}" if sep else path
