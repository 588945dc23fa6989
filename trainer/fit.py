"""Build everything a run needs from its `RunConfig` and train: plan -> strategy -> module -> fit.

Nothing here knows Hydra: `trainer.train` hands over the validated config, the output directory and
what tracking records about the command line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from trainer import checkpoint, tracking
from trainer.config import ConfigError, RunConfig, locate
from trainer.data import TokenDataModule
from trainer.hardware import HardwareSpec
from trainer.monitor import ProgressDisplay, StepMonitor, Throughput
from trainer.plan import MeshPlan, plan

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    plan: MeshPlan
    checkpoint: str | None
    metrics: dict[str, float]
    run_id: str | None


def fit(run: RunConfig, *, run_dir: Path, resolved: dict[str, Any], overrides: list[str],
        sweep: tracking.SweepInfo | None = None) -> FitResult:
    mesh_plan = plan(run)
    run = with_plan(run, mesh_plan)
    _quiet_lightning()
    _same_threads_on_every_rank(run)
    pl.seed_everything(run.seed, workers=True, verbose=False)
    hardware = HardwareSpec(run.hardware)
    module = build_module(run)
    data = TokenDataModule(run.data, seed=run.seed)
    _check_data_fits_model(run, data)
    # A destination that cannot be written, or a resume URL that is not a committed checkpoint,
    # stops the run here, before any step or MLflow run exists.
    checkpoint.check_destination(run.checkpoint, run_dir)
    ckpt_path = checkpoint.resume_path(run.checkpoint, run_dir)

    track = tracking.setup(run, run_dir=run_dir, resolved_config=resolved, overrides=overrides,
                           mesh_shape=dict(zip(mesh_plan.dim_names, mesh_plan.shape, strict=True)),
                           rank=_global_rank(run), sweep=sweep)
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
    callbacks: list[pl.Callback] = [monitor, saver]
    if run.trainer.progress_bar:
        callbacks.append(ProgressDisplay(monitor, log_every=max(run.trainer.log_every_n_steps,
                                                                  run.trainer.max_steps // 20)))
    if track:
        callbacks += track.callbacks

    plugins = _precision_plugins(run)
    trainer = pl.Trainer(
        accelerator=_accelerator(run),
        devices=run.ranks_per_node,
        num_nodes=run.cluster.nodes,
        strategy=checkpoint.attach(build_strategy(run, mesh_plan), checkpoints),
        precision=None if plugins else run.trainer.precision,
        plugins=plugins,
        max_steps=run.trainer.max_steps,
        accumulate_grad_batches=_accumulation(run, mesh_plan),
        logger=track.logger if track else False,
        callbacks=callbacks,
        default_root_dir=run_dir,
        # Our sampler shards by data-parallel rank itself (Lightning's injected one would shard by
        # global rank, wrong under tensor parallel) and its position is part of the checkpoint.
        use_distributed_sampler=False,
        enable_checkpointing=False,  # PeriodicCheckpoint commits and prunes; see trainer/checkpoint
        enable_progress_bar=False,  # ProgressDisplay counts optimizer steps, not epoch batches
        enable_model_summary=False,
        log_every_n_steps=run.trainer.log_every_n_steps,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    if ckpt_path and trainer.is_global_zero:
        log.info("resuming from %s", ckpt_path)
    status = "FAILED"
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        status = "FINISHED" if not trainer.interrupted else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SIGTERMException as exc:
        # Lightning turns SIGTERM into a SystemExit without a code, which would exit 0: a
        # scheduler would count a preempted job as succeeded. Exit as a process killed by it.
        status = "KILLED"
        raise SystemExit(128 + signal.SIGTERM) from exc
    finally:
        if track:
            track.close(status)
    result = FitResult(mesh_plan, saver.last_saved, dict(monitor.latest),
                       track.run_id if track else None)
    if trainer.is_global_zero:
        _report(result, track)
    return result


def _check_data_fits_model(run: RunConfig, data: TokenDataModule) -> None:
    """Open the dataset before anything else starts: a missing or unreadable dataset, or token ids
    the model has no embedding for, stop the run here with one line."""
    if run.uses_reference_model and data.vocab_size > run.model.vocab_size:
        raise ConfigError("model.vocab_size", run.model.vocab_size,
                          f"the dataset {run.data.path or 'stdlib'} has token ids up to "
                          f"{data.vocab_size - 1}; use a vocabulary of at least {data.vocab_size}")


def with_plan(run: RunConfig, mesh_plan: MeshPlan) -> RunConfig:
    """`run` with its parallelism settled: -1 filled and, for `auto`, the planner's choice, so
    everything downstream reads one concrete mesh."""
    dims = dict(zip(mesh_plan.dim_names, mesh_plan.shape, strict=True))
    parallelism = dataclasses.replace(
        run.parallelism, **dims, activation_checkpointing=mesh_plan.activation_checkpointing)
    return dataclasses.replace(run, parallelism=parallelism)


def build_module(run: RunConfig) -> pl.LightningModule:
    """The reference decoder's module, or the user's `model._target_` built from `model.kwargs`."""
    if run.uses_reference_model:
        from trainer.module import LanguageModel

        return LanguageModel(run)
    return locate(run.model._target_)(**run.model.kwargs)


def build_strategy(run: RunConfig, mesh_plan: MeshPlan) -> Any:
    hardware = run.hardware
    if mesh_plan.dp_shard == 1 and mesh_plan.tp == 1 and mesh_plan.cp == 1:
        if mesh_plan.world_size == 1:
            return checkpoint.single_process(hardware.device_type)
        return checkpoint.data_parallel(hardware.backend)
    from trainer.mesh import MeshStrategy

    return MeshStrategy(mesh_plan, HardwareSpec(hardware),
                        storage_options=run.checkpoint.storage_options)


def _accelerator(run: RunConfig) -> Any:
    if run.hardware.device_type == "neuron":
        from trainer.mesh import neuron_accelerator

        return neuron_accelerator()
    return run.hardware.device_type


def _precision_plugins(run: RunConfig) -> list[Any]:
    """Lightning builds autocast for "cuda" whenever the accelerator is an object, as the Neuron
    one is; mixed precision on Neuron needs its device named. (Untested: no Trainium here.)"""
    if run.hardware.device_type != "neuron" or "mixed" not in run.trainer.precision:
        return []
    from pytorch_lightning.plugins.precision import MixedPrecision

    return [MixedPrecision(run.trainer.precision, device="neuron")]


def _accumulation(run: RunConfig, mesh_plan: MeshPlan) -> int:
    if run.data.global_batch_size is None:
        return 1
    return run.data.global_batch_size // (run.data.micro_batch_size * mesh_plan.dp_size)


def _throughput(run: RunConfig, mesh_plan: MeshPlan, hardware: HardwareSpec,
                module: pl.LightningModule) -> Throughput:
    tokens = (run.data.micro_batch_size * run.data.seq_len * mesh_plan.dp_size
              * _accumulation(run, mesh_plan))
    flops = getattr(module, "flops_per_token", None)
    return Throughput(
        tokens_per_step=tokens,
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
    drift apart by an ulp and a resumed run no longer matches (NOTES.md, exact resume)."""
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
        log.info("final loss %.4f after %s", result.metrics.get("train/loss", float("nan")),
                 f"{result.plan.world_size} rank(s), mesh "
                 + " x ".join(f"{n}={s}" for n, s in zip(result.plan.dim_names, result.plan.shape,
                                                          strict=True)))
    if result.checkpoint:
        log.info("checkpoint: %s", result.checkpoint)
    if track is not None:
        log.info("MLflow run %s; see it with: %s", track.run_id, track.ui_hint)


def check_launchable(run: RunConfig) -> None:
    """What `python -m trainer` itself can start: one node (more go through `launch`)."""
    in_cluster = "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_JOB_ID" in os.environ
    if run.cluster.nodes > 1 and not in_cluster:
        raise ConfigError("cluster.nodes", run.cluster.nodes,
                          "a run of several nodes starts through `python -m launch` (SLURM, EKS) "
                          "or torchrun on each node; `python -m trainer` alone runs one node")
