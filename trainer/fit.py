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
from trainer.module import build_module, precision_plugin
from trainer.monitor import ProgressDisplay, StepMonitor, Throughput
from trainer.plan import MeshPlan
from trainer.preemption import Preemption, isolate_restart_attempts
from trainer.preflight import check_startable

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    plan: MeshPlan
    checkpoint: str | None
    metrics: dict[str, float]
    run_id: str | None


def fit(run: RunConfig, *, run_dir: Path, resolved: dict[str, Any], overrides: list[str],
        sweep: tracking.SweepInfo | None = None,
        callbacks: Sequence[pl.Callback] = ()) -> FitResult:
    """Train `run`; `callbacks` join the Trainer's own (step monitor, checkpoints, tracking)."""
    mesh_plan = check_startable(run)  # again: callers may come in without preflight
    _quiet_lightning()
    _same_threads_on_every_rank(run)
    isolate_restart_attempts()
    pl.seed_everything(run.seed, workers=True, verbose=False)
    hardware = HardwareSpec(run.hardware)
    module = build_module(run, mesh_plan)
    data = TokenDataModule(run.data, seed=run.seed, eval_batches=run.trainer.eval_batches)
    # Opened before anything else starts: unreadable or truncated shards (or a remote copy that
    # fails its checksum) stop the run here with one line, before any process group exists.
    data.setup()
    # A destination that cannot be written, or a resume URL that is not a committed checkpoint,
    # stops the run here, before any step or MLflow run exists.
    checkpoint.check_destination(run.checkpoint, run_dir)
    ckpt_path = checkpoint.resume_path(run.checkpoint, run_dir)

    if sweep is None and run.launch.sweep_dir:  # a sweep job that a cluster started
        sweep = tracking.SweepInfo(sweep_dir=run.launch.sweep_dir, job_num=run.launch.job_num)
    track = tracking.setup(run, run_dir=run_dir, resolved_config=resolved, overrides=overrides,
                           mesh_shape=dict(zip(mesh_plan.dim_names, mesh_plan.shape, strict=True)),
                           rank=_global_rank(run), sweep=sweep,
                           launch_artifact=_launch_artifact(run))
    monitor = StepMonitor(_throughput(run, mesh_plan, hardware, module),
                          every_n=run.trainer.log_every_n_steps)
    checkpoints = checkpoint.CheckpointIO(
        run.checkpoint.storage_options, io_threads=run.checkpoint.io_threads,
        mesh=dict(zip(mesh_plan.dim_names, mesh_plan.shape, strict=True)),
        config_hash=checkpoint.config_hash(run), model=checkpoint.model_shape(run))
    checkpoints.fallback = run.checkpoint.resume == "last"
    saver = checkpoint.PeriodicCheckpoint(
        checkpoints, checkpoint.checkpoint_dir(run.checkpoint, run_dir),
        every_n_steps=run.checkpoint.every_n_steps, keep_last=run.checkpoint.keep_last,
        keep_every=run.checkpoint.keep_every, async_save=run.checkpoint.async_save,
        on_saved=track.log_checkpoint if track else None,
        on_failed=track.log_checkpoint_failure if track else None)
    preemption = Preemption(saver, max_requeues=run.cluster.max_requeues)
    # after preemption's: evaluation gives way to a stop it asked for
    every: list[pl.Callback] = [monitor, saver, preemption, *data.callbacks()]
    if run.trainer.progress_bar:
        every.append(ProgressDisplay(monitor, log_every=max(run.trainer.log_every_n_steps,
                                                                  run.trainer.max_steps // 20),
                                     evaluation=data.evaluation))
    if track:
        every.append(tracking.RunContinuity(track))
    every += callbacks

    trainer = pl.Trainer(
        accelerator=_accelerator(run),
        devices=run.ranks_per_node,
        num_nodes=run.cluster.nodes,
        strategy=checkpoint.attach(build_strategy(run, mesh_plan), checkpoints),
        plugins=[precision_plugin(run)],
        max_steps=run.trainer.max_steps,
        accumulate_grad_batches=mesh_plan.accumulation,
        logger=tracking.TrackingLogger(track) if track else False,
        callbacks=every,
        default_root_dir=run_dir,
        # Our sampler shards by data-parallel rank itself (Lightning's injected one would shard by
        # global rank, wrong under tensor parallel) and its position is part of the checkpoint.
        use_distributed_sampler=False,
        enable_checkpointing=False,  # PeriodicCheckpoint commits and prunes; see trainer/checkpoint
        enable_progress_bar=False,  # ProgressDisplay counts optimizer steps, not epoch batches
        enable_model_summary=False,
        log_every_n_steps=run.trainer.log_every_n_steps,
        **data.trainer_arguments(run.trainer, mesh_plan.accumulation),  # evaluation's schedule
    )
    if ckpt_path and trainer.is_global_zero:
        log.info("resuming from %s", ckpt_path)
    ended: BaseException | None = None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
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
    # Only after a clean finish: a rank that raised may leave others inside a collective, where
    # tearing the group down would hang them. torch asks every process to do this (NCCL's
    # pending work is flushed here); gloo's threads outlive it while the meshes hold their
    # backends, which `trainer.train` deals with at exit.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    result = FitResult(mesh_plan, saver.last_saved, dict(monitor.latest),
                       track.run_id if track else None)
    if trainer.is_global_zero:
        _report(result, track)
    return result


def _launch_artifact(run: RunConfig) -> tuple[str, str] | None:
    """The job file `python -m launch` rendered for this run (tracking logs it, redacted)."""
    path = Path(run.launch.rendered) if run.launch.rendered else None
    return (path.name, path.read_text()) if path and path.is_file() else None


def build_strategy(run: RunConfig, mesh_plan: MeshPlan) -> Any:
    hardware = run.hardware
    if mesh_plan.world_size == 1:
        return checkpoint.single_process(hardware.device_type)
    if mesh_plan.replicas_only:
        return checkpoint.data_parallel(hardware.backend)
    from trainer.mesh import MeshStrategy

    return MeshStrategy(mesh_plan, HardwareSpec(hardware),
                        storage_options=run.checkpoint.storage_options)


def _accelerator(run: RunConfig) -> Any:
    if run.hardware.device_type == "neuron":
        from trainer.mesh import neuron_accelerator

        return neuron_accelerator()
    return run.hardware.device_type


def _throughput(run: RunConfig, mesh_plan: MeshPlan, hardware: HardwareSpec,
                module: pl.LightningModule) -> Throughput:
    flops = getattr(module, "flops_per_token", None)
    return Throughput(
        tokens_per_step=mesh_plan.tokens_per_step,
        flops_per_token=flops(run.data.seq_len) if callable(flops) else None,
        peak_flops_per_chip=hardware.peak_flops_per_rank() * run.hardware.ranks_per_chip,
        chips=mesh_plan.world_size / run.hardware.ranks_per_chip,
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


def _global_rank(run: RunConfig) -> int:
    """This process's rank before any process group exists: torchrun and SLURM export it;
    Lightning's own launcher exports only the local rank to the processes it starts."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    node = int(os.environ.get("NODE_RANK", "0"))
    return node * run.ranks_per_node + int(os.environ.get("LOCAL_RANK", "0"))


def _report(result: FitResult, track: tracking.Tracking | None) -> None:
    if result.metrics:
        log.info("final loss %.4f after %d rank(s), mesh %s",
                 result.metrics.get("train/loss", float("nan")), result.plan.world_size,
                 result.plan.describe())
    if result.checkpoint:
        log.info("checkpoint: %s", result.checkpoint)
    if track is not None:
        log.info("MLflow run %s; see it with: %s", track.run_id, track.ui_hint)
