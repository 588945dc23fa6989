"""What a person watches while a run trains: step metrics for the loggers, and a progress display.

`StepMonitor` measures every optimizer step cheaply (a clock read and a device-side add) and, every
`every_n` steps, reduces across ranks, waits for the device once and hands plain floats to the
loggers. Nothing in between forces a host sync, so the monitor costs the training loop nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Throughput:
    """What one optimizer step means in tokens and FLOPs, to turn step times into rates."""

    tokens_per_step: int  # across all data-parallel ranks and accumulated micro batches
    flops_per_token: float | None  # None for a module that does not say
    peak_flops_per_chip: float
    chips: float  # ranks / ranks_per_chip


class StepMonitor(pl.Callback):
    def __init__(self, throughput: Throughput, every_n: int):
        self.throughput = throughput
        self.every_n = every_n
        self.latest: dict[str, float] = {}
        self.latest_step = 0
        self._loss_sum: torch.Tensor | None = None
        self._micro_batches = 0
        self._step = 0
        self._window_start = 0.0
        self._window_steps = 0
        self._data_wait = 0.0
        self._batch_end: float | None = None
        self._paused: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step
        self._window_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._batch_end is not None:
            self._data_wait += time.perf_counter() - self._batch_end

    def on_validation_start(self, trainer, pl_module) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # An evaluation is neither step time nor data wait: the clocks skip it.
        if self._paused is not None:
            away = time.perf_counter() - self._paused
            self._window_start += away
            if self._batch_end is not None:
                self._batch_end += away
            self._paused = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            loss = loss.detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._micro_batches += 1
        if trainer.global_step != self._step:  # an optimizer step just happened
            self._step = trainer.global_step
            self._window_steps += 1
            if self._step % self.every_n == 0 or self._step >= (trainer.max_steps or 0):
                self._emit(trainer, pl_module)
        self._batch_end = time.perf_counter()

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = self._loss_sum / max(1, self._micro_batches) if self._loss_sum is not None else None
        values = [loss if loss is not None else torch.zeros(())]
        grad_norm = getattr(pl_module, "last_grad_norm", None)
        values.append(grad_norm if grad_norm is not None else torch.zeros(()))
        # the module's own device-side metrics (MoE router health), global already
        extra = pl_module.step_metrics() if hasattr(pl_module, "step_metrics") else {}
        values += extra.values()
        stacked = torch.stack([v.float().to(pl_module.device) for v in values])
        # Mean over ranks; the grad norm is already global, so averaging leaves it unchanged.
        stacked = trainer.strategy.reduce(stacked, reduce_op="mean")
        loss_value, norm_value, *extra_values = stacked.tolist()  # the one host sync
        now = time.perf_counter()
        seconds = now - self._window_start
        steps = max(1, self._window_steps)
        t = self.throughput
        tokens_per_s = t.tokens_per_step * steps / seconds
        metrics = {
            "train/loss": loss_value,
            "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens_per_s": tokens_per_s,
            "perf/step_seconds": seconds / steps,
            "perf/data_wait_seconds": self._data_wait / steps,
            "memory/host_rss_gib": _host_rss_bytes() / 2**30,
        }
        if grad_norm is not None:
            metrics["train/grad_norm"] = norm_value
        metrics.update(zip(extra, extra_values, strict=True))
        if t.flops_per_token:
            tflops = tokens_per_s * t.flops_per_token / t.chips / 1e12
            metrics["perf/tflops_per_chip"] = tflops
            metrics["perf/mfu"] = tflops * 1e12 / t.peak_flops_per_chip
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["memory/device_max_allocated_gib"] = (
                torch.cuda.max_memory_allocated(pl_module.device) / 2**30)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=self._step)
        self.latest, self.latest_step = metrics, self._step
        self._loss_sum, self._micro_batches = None, 0
        self._window_start, self._window_steps, self._data_wait = now, 0, 0.0


def _host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """The most resident memory a block of code added to the process: Linux's peak-RSS mark
    (VmHWM) is reset to the current RSS on entry (/proc/self/clear_refs, "5") and read on exit.
    `beyond` is None where /proc offers neither."""

    def __init__(self) -> None:
        self.start = 0
        self.beyond: int | None = None

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _host_rss_bytes()
        except OSError:
            self.start = -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start < 0:
            return
        try:
            with open("/proc/self/status") as f:
                peak = next(int(line.split()[1]) * 1024 for line in f
                            if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return
        self.beyond = max(0, peak - self.start)


class ProgressDisplay(pl.Callback):
    """A Rich progress bar over optimizer steps (loss, tokens/s, MFU) on a terminal; on anything
    else (a SLURM log, CI) a plain log line every `log_every` steps."""

    def __init__(self, monitor: StepMonitor, log_every: int, interactive: bool | None = None,
                 note: str = "", evaluation: Any = None):
        self.monitor = monitor
        self.note = note  # said on every line, e.g. "fp8 emulated"
        self.evaluation = evaluation  # its `latest` eval/loss joins the line
        self.log_every = log_every
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._progress = None
        self._task = None
        self._logged_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (trainer.is_global_zero and self.interactive):
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("<"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
            refresh_per_second=4,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=trainer.max_steps,
                                             completed=trainer.global_step, stats="")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=self._stats())
        elif self.monitor.latest and self.monitor.latest_step != self._logged_step and (
            self.monitor.latest_step % self.log_every == 0 or step >= trainer.max_steps
        ):
            self._logged_step = self.monitor.latest_step
            log.info("step %d/%d  %s", self.monitor.latest_step, trainer.max_steps, self._stats())

    def _stats(self) -> str:
        m = self.monitor.latest
        if not m:
            return ""
        parts = [f"loss {m['train/loss']:.4f}", f"lr {m['train/lr']:.2e}",
                 f"{m['train/tokens_per_s']:,.0f} tok/s"]
        if "perf/mfu" in m:
            parts.append(f"MFU {100 * m['perf/mfu']:.1f}%")
        latest = getattr(self.evaluation, "latest", None)
        if latest:
            parts.append(f"eval {latest['eval/loss']:.4f} (ppl {latest['eval/perplexity']:.2f})")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
