"""Build everything a run needs from its `RunConfig` and train: plan -> strategy -> module -> fit.

Nothing here knows Hydra: `trainer.train` hands over the validated config, the output directory and
what tracking records about the command line.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from trainer import checkpoint, tracking
from trainer.config import RunConfig
from trainer.data.datamodule import TokenDataModule
from trainer.hardware import HardwareSpec
from trainer.models.low_precision import LowPrecision
from trainer.module import build_module, precision_plugin
from trainer.monitor import ProgressDisplay, StepMonitor, Throughput
from trainer.plan import ParallelDims, resolve_precision
from trainer.preemption import Preemption, isolate_restart_attempts
from trainer.preflight import check_startable, global_rank

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    dims: ParallelDims
    checkpoint: str | None
    metrics: dict[str, float]
    run_id: str | None


@dataclass
class Checkpointing:
    """Where a run saves and what it resumes: the IO its strategy saves through, the directory,
    and the checkpoint to resume from (None: start at step 0)."""

    io: checkpoint.CheckpointIO
    directory: str
    resume_from: str | None


def fit(run: RunConfig, *, run_dir: Path, resolved: dict[str, Any], overrides: list[str],
        sweep: tracking.SweepInfo | None = None,
        callbacks: Sequence[pl.Callback] = ()) -> FitResult:
    """Train `run`; `callbacks` join the Trainer's own (step monitor, checkpoints, tracking)."""
    run = resolve_precision(run)  # trainer.precision=auto: the planner's choice from here on
    dims = check_startable(run)  # again: callers may come in without preflight
    prepare_process(run)
    module = build_module(run, dims)
    checkpoints = build_checkpointing(run, dims, run_dir)  # a refused resume: its line alone
    data = open_data(run)
    track = start_tracking(run, dims, run_dir, resolved, overrides, sweep)
    saver = build_saver(run, checkpoints, track)
    monitor = StepMonitor(_throughput(run, dims, module), every_n=run.trainer.log_every_n_steps)
    preemption = Preemption(saver, max_requeues=run.cluster.max_requeues)
    # The data's own callbacks (evaluation, a mixture's token counts) come after preemption's:
    # evaluation gives way to a stop that preemption asked for.
    trainer = build_trainer(run, dims, checkpoints.io, run_dir, track,
                            [monitor, saver, preemption, *data.callbacks(),
                             *display_callbacks(run, dims, monitor, track, data.evaluation),
                             *callbacks],
                            data.trainer_arguments(run.trainer, dims.accumulation))
    train(trainer, module, data, checkpoints.resume_from, track, preemption)
    result = FitResult(dims, saver.last_saved, dict(monitor.latest),
                       track.run_id if track else None)
    if trainer.is_global_zero:
        _report(result, track)
    return result


def prepare_process(run: RunConfig) -> None:
    """What this process needs before anything is built: quiet logs, equal thread counts, a
    restart attempt's own state, and the seed."""
    _quiet_lightning()
    _same_threads_on_every_rank(run)
    isolate_restart_attempts()
    pl.seed_everything(run.seed, workers=True, verbose=False)


def open_data(run: RunConfig) -> TokenDataModule:
    """The training data, opened now: unreadable or truncated shards (or a remote copy that fails
    its checksum) stop the run with one line before any process group exists."""
    data = TokenDataModule(run.data, seed=run.seed, eval_batches=run.trainer.eval_batches,
                           document_mask=run.uses_document_mask)
    data.setup()
    return data


def build_checkpointing(run: RunConfig, dims: ParallelDims, run_dir: Path) -> Checkpointing:
    """The run's checkpoint IO, after checking the destination can be written and deciding what to
    resume from (rank 0 verifies it; one line, before any step or MLflow run exists)."""
    cfg = run.checkpoint
    checkpoint.check_destination(cfg, run_dir)
    resume = checkpoint.resume_path(cfg, run_dir, verify=global_rank(run) == 0)
    directory = checkpoint.checkpoint_dir(cfg, run_dir)
    io = checkpoint.CheckpointIO(
        cfg.storage_options, io_threads=cfg.io_threads, mesh=dims.sizes,
        config_hash=checkpoint.config_hash(run), model=checkpoint.model_shape(run),
        retention=checkpoint.Retention(directory, cfg.keep_last, cfg.keep_every,
                                       protected=resume.keep))
    return Checkpointing(io, directory, resume.url)


def build_saver(run: RunConfig, checkpoints: Checkpointing,
                track: tracking.Tracking | None) -> checkpoint.PeriodicCheckpoint:
    """The saver in the training loop, reporting each commit or failure to MLflow."""
    return checkpoint.PeriodicCheckpoint(
        checkpoints.io, checkpoints.directory, every_n_steps=run.checkpoint.every_n_steps,
        async_save=run.checkpoint.async_save,
        on_saved=track.log_checkpoint if track else None,
        on_failed=track.log_checkpoint_failure if track else None)


def start_tracking(run: RunConfig, dims: ParallelDims, run_dir: Path, resolved: dict[str, Any],
                   overrides: list[str],
                   sweep: tracking.SweepInfo | None) -> tracking.Tracking | None:
    """The MLflow run this attempt logs to (None with tracking=none); a sweep job a cluster
    started finds its sweep from launch.sweep_dir."""
    if sweep is None and run.launch.sweep_dir:
        sweep = tracking.SweepInfo(sweep_dir=run.launch.sweep_dir, job_num=run.launch.job_num)
    return tracking.setup(run, run_dir=run_dir, resolved_config=resolved, overrides=overrides,
                          mesh_shape=dims.sizes, rank=global_rank(run), sweep=sweep,
                          launch_artifact=_launch_artifact(run))


def display_callbacks(run: RunConfig, dims: ParallelDims, monitor: StepMonitor,
                      track: tracking.Tracking | None, evaluation: Any = None) -> list[pl.Callback]:
    """What a person watches: the progress display (which says fp8 / mxfp8, and when torchao
    emulates it, and the latest `evaluation`), and MLflow's view of the run's continuity and
    checkpoints."""
    low_precision = LowPrecision.of(run, fsdp=dims.fsdp)
    if low_precision is not None and global_rank(run) == 0:
        log.info("precision: %s", low_precision.describe())
    shown: list[pl.Callback] = []
    if run.trainer.progress_bar:
        shown.append(ProgressDisplay(monitor, log_every=max(run.trainer.log_every_n_steps,
                                                            run.trainer.max_steps // 20),
                                     note=low_precision.label if low_precision else "",
                                     evaluation=evaluation))
    if track:
        shown.append(tracking.RunContinuity(track))
    return shown


def build_trainer(run: RunConfig, dims: ParallelDims, io: checkpoint.CheckpointIO, run_dir: Path,
                  track: tracking.Tracking | None, callbacks: list[pl.Callback],
                  validation: dict[str, Any]) -> pl.Trainer:
    """The Lightning Trainer; `validation` schedules the validation loop (evaluation's)."""
    return pl.Trainer(
        accelerator=_accelerator(run),
        devices=run.ranks_per_node,
        num_nodes=run.cluster.nodes,
        strategy=build_strategy(run, dims, io),
        plugins=[precision_plugin(run)],
        max_steps=run.trainer.max_steps,
        accumulate_grad_batches=dims.accumulation,
        logger=tracking.TrackingLogger(track) if track else False,
        callbacks=callbacks,
        default_root_dir=run_dir,
        # Our sampler shards by data-parallel rank itself (Lightning's injected one would shard by
        # global rank, wrong under tensor parallel) and its position is part of the checkpoint.
        use_distributed_sampler=False,
        enable_checkpointing=False,  # PeriodicCheckpoint commits and prunes; see trainer/checkpoint
        enable_progress_bar=False,  # ProgressDisplay counts optimizer steps, not epoch batches
        enable_model_summary=False,
        log_every_n_steps=run.trainer.log_every_n_steps,
        **validation,
    )


def train(trainer: pl.Trainer, module: pl.LightningModule, data: TokenDataModule,
          resume_from: str | None, track: tracking.Tracking | None,
          preemption: Preemption) -> None:
    """`Trainer.fit`, with the MLflow run's status decided from how it ended."""
    if resume_from and trainer.is_global_zero:
        log.info("resuming from %s", resume_from)
    ended: BaseException | None = None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    except BaseException as exc:
        ended = exc
        if isinstance(exc, SIGTERMException):
            # Lightning turns SIGTERM into a SystemExit without a code, which would exit 0: a
            # scheduler would count a preempted job as succeeded. Exit as a process killed by it.
            raise SystemExit(128 + signal.SIGTERM) from exc
        raise
    finally:
        if track:
            # a preempted run stopped early on purpose: this attempt is KILLED, not FINISHED
            stopped = trainer.interrupted or preemption.stopped
            track.close(tracking.status_for(ended, interrupted=stopped))
    if trainer.is_global_zero:
        preemption.requeue()  # last: SLURM ends the job's processes as it requeues
    # Only after a clean finish: a rank that raised may leave others inside a collective, where
    # tearing the group down would hang them. NCCL's pending work is flushed here; gloo's threads
    # outlive it (`trainer.train` deals with them at exit).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launch_artifact(run: RunConfig) -> tuple[str, str] | None:
    """The job file `python -m launch` rendered for this run (tracking logs it, redacted)."""
    path = Path(run.launch.rendered) if run.launch.rendered else None
    return (path.name, path.read_text()) if path and path.is_file() else None


def build_strategy(run: RunConfig, dims: ParallelDims, io: checkpoint.CheckpointIO) -> Any:
    hardware = run.hardware
    if run.uses_xla:
        from trainer.xla.strategy import build_strategy as xla_strategy

        return xla_strategy(run, dims, io)
    if dims.world_size == 1:
        return checkpoint.SingleProcess(io, hardware.device_type)
    if dims.replicas_only:
        return checkpoint.DataParallel(io, hardware.backend)
    from trainer.mesh import MeshStrategy

    return MeshStrategy(dims, HardwareSpec(hardware), io)


def _accelerator(run: RunConfig) -> Any:
    if run.uses_xla:
        from trainer.xla.strategy import XlaAccelerator

        return XlaAccelerator()
    if run.hardware.device_type == "neuron":
        from trainer.mesh import neuron_accelerator

        return neuron_accelerator()
    return run.hardware.device_type


def _throughput(run: RunConfig, dims: ParallelDims, module: pl.LightningModule) -> Throughput:
    hardware = HardwareSpec(run.hardware)
    flops = getattr(module, "flops_per_token", None)
    return Throughput(
        tokens_per_step=dims.tokens_per_step,
        flops_per_token=flops(run.data.seq_len) if callable(flops) else None,
        peak_flops_per_chip=hardware.peak_flops_per_rank() * run.hardware.ranks_per_chip,
        chips=dims.world_size / run.hardware.ranks_per_chip,
    )


def _quiet_lightning() -> None:
    """Drop Lightning's advertising and a deprecation warning raised inside Lightning itself:
    neither says anything about this run."""

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in record.getMessage()

    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _same_threads_on_every_rank(run: RunConfig) -> None:
    """Give every CPU rank the same intra-op thread count, exported before Lightning starts the
    other ranks: ranks that run different thread counts round differently, tensor-parallel ranks
    drift apart by an ulp and a resumed run no longer matches the straight one (Lightning's
    launcher leaves rank 0 at one thread after it starts the others)."""
    if run.hardware.device_type != "cpu" or run.ranks_per_node == 1:
        return
    threads = os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // run.ranks_per_node)))
    torch.set_num_threads(int(threads))


def _report(result: FitResult, track: tracking.Tracking | None) -> None:
    if result.metrics:
        log.info("final loss %.4f after %d rank(s), mesh %s",
                 result.metrics.get("train/loss", float("nan")), result.dims.world_size,
                 result.dims.describe())
    if result.checkpoint:
        log.info("checkpoint: %s", result.checkpoint)
    if track is not None:
        log.info("MLflow run %s; see it with: %s", track.run_id, track.ui_hint)
