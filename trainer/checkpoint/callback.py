"""`PeriodicCheckpoint`: saves every N optimizer steps from inside the training loop, reports each
save once it is committed (or failed), and restores the RNG states of the checkpoint a run
resumed from (which `CheckpointIO.load` hands over in the loaded checkpoint).

Saving happens inside the loop, not after `fit` returns: a checkpoint taken after the loop ends
records the epoch as finished, and a resumed sampler would then start the next epoch's order.
RNG states are restored in `on_train_start`, not at load: the data loader's iterator draws from the
global RNG when it starts, after loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer import call

from trainer.checkpoint.io import (
    RESUMED_FROM_KEY,
    RNG_KEY,
    CheckpointIO,
    SaveResult,
    restore_rng,
)
from trainer.checkpoint.manifest import step_name
from trainer.checkpoint.storage import join

log = logging.getLogger(__name__)

OnSaved = Callable[[int, str, float, int], None]  # step, url, seconds, bytes
OnFailed = Callable[[int, str, str], None]  # step, url, reason


class CheckpointFailed(RuntimeError):
    pass


class PeriodicCheckpoint(pl.Callback):
    def __init__(self, io: CheckpointIO, directory: str, *, every_n_steps: int,
                 async_save: bool = True, on_saved: OnSaved | None = None,
                 on_failed: OnFailed | None = None):
        self.io = io
        self.directory = directory
        self.every_n_steps = every_n_steps
        self.async_save = async_save
        self.on_saved = on_saved
        self.on_failed = on_failed
        self.last_saved: str | None = None  # the newest committed checkpoint of this run
        self.resumed_from: str | None = None  # the checkpoint this run started from
        self.failures = 0
        self._step = -1
        self._is_zero = True
        self._rng: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------------------
    # Lightning hooks

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._rng = checkpoint.get(RNG_KEY)
        self.resumed_from = checkpoint.get(RESUMED_FROM_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._is_zero = trainer.is_global_zero
        if self._rng is not None:  # now, not at load: the loader's iterator drew from it since
            restore_rng(self._rng)
            self._rng = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx):
        self._report_finished()
        step = trainer.global_step
        if step == self._step:  # still accumulating gradients for this step
            return
        self._step = step
        at_end = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if at_end or (self.every_n_steps and step % self.every_n_steps == 0):
            self._start(trainer, blocking=not self.async_save)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = self.io.wait()  # the final save is waited for
        self._report(result)
        if result is not None and not result.ok:
            # Training went on past failed periodic saves, but a run whose last save failed has
            # lost the steps since its newest commit: exiting 0 would tell a scheduler (or a
            # sweep) that the work is safe. Every rank got the same outcome, so all raise here.
            raise CheckpointFailed(
                f"the run's last checkpoint (step {result.step}, {result.url}) was not "
                f"committed: {result.error}; newest committed: "
                f"{self.last_saved or self.resumed_from or 'none'} (checkpoint.resume=last "
                f"redoes the steps after it)")

    # -------------------------------------------------------------------------------------------

    def save(self, trainer: pl.Trainer) -> str:
        """Save now, on every rank together (at a step boundary), and return the checkpoint's URL
        once it is committed: any save in flight is waited for first. Raises CheckpointFailed
        when this save did not commit."""
        self._report(self.io.wait())
        result = self._start(trainer, blocking=True)
        if not result.ok:
            raise CheckpointFailed(f"checkpoint step {result.step} at {result.url}: "
                                   f"{result.error}")
        return result.url

    def _start(self, trainer: pl.Trainer, *, blocking: bool) -> SaveResult:
        self._report(self.io.wait())
        url = join(self.directory, step_name(trainer.global_step))
        pending = self.io.save(trainer.lightning_module, trainer.optimizers,
                               trainer_state(trainer), url, trainer.global_step,
                               blocking=blocking)
        if blocking:
            result = pending.wait()
            self._report(result)
            return result
        return pending.result

    def _report_finished(self) -> None:
        pending = self.io.in_flight()
        if pending is not None and pending.done():
            self._report(self.io.wait())

    def _report(self, result: SaveResult | None) -> None:
        if result is None:
            return
        if result.ok:
            self.last_saved = result.url
            if self._is_zero:
                if self.on_saved is not None:
                    self.on_saved(result.step, result.url, result.seconds, result.nbytes)
                log.info("checkpoint step %d: %s (%.1f MiB, %.2f s, training blocked %.2f s)",
                         result.step, result.url, result.nbytes / 2**20, result.seconds,
                         result.blocked_seconds)
            return
        self.failures += 1
        if self._is_zero:
            log.error("checkpoint step %d FAILED, training goes on; newest committed: %s. "
                      "Reason: %s", result.step, self.last_saved or self.resumed_from
                      or "none", result.error)
            if self.on_failed is not None:
                self.on_failed(result.step, result.url, result.error or "unknown")


def trainer_state(trainer: pl.Trainer) -> dict[str, Any]:
    """What Lightning's own checkpoint holds beside the model and optimizers: loop counters (with
    the data loader's position), callbacks' state, LR schedulers, the datamodule's and the
    precision plugin's state. Built from the parts, so the model is not copied a second time."""
    state: dict[str, Any] = {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "pytorch-lightning_version": pl.__version__,
        "loops": trainer._checkpoint_connector._get_loops_state_dict(),
        "callbacks": call._call_callbacks_state_dict(trainer),
        "lr_schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
    }
    precision = trainer.precision_plugin.state_dict()
    if precision:
        state[trainer.precision_plugin.__class__.__qualname__] = precision
    datamodule = trainer.datamodule
    if datamodule is not None:
        data_state = call._call_lightning_datamodule_hook(trainer, "state_dict")
        if data_state:
            state[datamodule.__class__.__qualname__] = data_state
    return state
