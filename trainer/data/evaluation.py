"""Held-out evaluation inside Lightning's validation loop, and a mixture's token counts.

`Evaluation` schedules the validation loop (every `trainer.eval_every_n_steps` optimizer steps and
after the last), averages the module's `validation_step` losses over every rank, and hands
`eval/loss` and `eval/perplexity` to the loggers (MLflow) and to the progress display.
`SourceTokens` logs how many tokens each source of a mixture has given (`data/tokens/<name>`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch

if TYPE_CHECKING:
    from trainer.config import TrainerConfig
    from trainer.data.datamodule import TokenDataModule

log = logging.getLogger(__name__)


class Evaluation(pl.Callback):
    def __init__(self) -> None:
        self.latest: dict[str, float] = {}
        self.latest_step = -1
        self._sum: torch.Tensor | None = None
        self._batches = 0
        self._max_steps = 0

    def trainer_arguments(self, trainer: TrainerConfig, accumulation: int) -> dict[str, Any]:
        # Lightning counts micro batches, not optimizer steps; with no cadence, validation comes
        # only at the end (see on_train_batch_end).
        every = trainer.eval_every_n_steps or trainer.max_steps + 1
        return {
            "check_val_every_n_epoch": None,  # count batches across epochs, not per epoch
            "val_check_interval": every * accumulation,
            "num_sanity_val_steps": 0,  # (EvalLoader itself stops after trainer.eval_batches)
            # no_grad, not inference_mode: tensors made under inference_mode (FSDP2's unsharded
            # parameters among them) cannot take part in the training step that follows
            "inference_mode": False,
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._max_steps = trainer.max_steps or 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.should_stop and step < self._max_steps:
            # Something else is stopping the run early (a preemption signal, with the deadline
            # near): Lightning would validate first; skip it and let the run stop.
            trainer.fit_loop.epoch_loop._skip_next_val = True
        elif step >= self._max_steps > 0 and self.latest_step != step:
            # The last step: asking Lightning to stop here is how it validates once more before
            # the loop ends (it validates before honouring a stop request).
            trainer.should_stop = True

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sum, self._batches = None, 0

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach().float()
        self._sum = loss if self._sum is None else self._sum + loss
        self._batches += 1

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sum is None:
            return
        # Every rank ran the same number of equal-sized batches: the mean over ranks of each
        # rank's mean is the mean over all held-out tokens (tensor-parallel peers agree).
        mean = trainer.strategy.reduce(self._sum / self._batches, reduce_op="mean")
        loss = float(mean)  # the one host sync of an evaluation
        step = trainer.global_step
        self.latest = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0))}
        self.latest_step = step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.latest, step=step)
            log.info("eval step %d: loss %.4f  perplexity %.2f (%d batches per rank)", step,
                     loss, self.latest["eval/perplexity"], self._batches)


class SourceTokens(pl.Callback):
    """Tokens drawn from each source of a mixture, logged with the step metrics."""

    def __init__(self, data: TokenDataModule):
        self.data = data
        self._step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step or not trainer.is_global_zero:
            return
        self._step = step
        if step % trainer.log_every_n_steps == 0 or step >= (trainer.max_steps or 0):
            metrics = {f"data/tokens/{name}": float(tokens)
                       for name, tokens in self.data.source_tokens().items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
