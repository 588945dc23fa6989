"""Lightning glue: the logger that feeds `Tracking`'s buffer, and the callback that carries the
run id through checkpoints and ends the run when the fit raises."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger

from trainer.tracking.status import FAILED, status_for, status_for_lightning

if TYPE_CHECKING:
    from trainer.tracking.run import Tracking


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
        """Lightning's end of fit: "failed" ends the run; otherwise this only flushes, and the
        trainer closes the run with the status it decides (`trainer.fit`): a fit that returned
        after a preemption stopped it early ended KILLED, not FINISHED."""
        if status_for_lightning(status) == FAILED:
            self._tracking.close(FAILED)
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
