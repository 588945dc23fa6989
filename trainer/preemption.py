"""Preemption: a warning signal becomes a checkpoint at the next step boundary, then a clean stop.

SLURM sends `--signal=B:USR1@<seconds>` before the time limit (and schedulers or people send USR1
to preempt); the batch script passes it on to every rank. Checkpointing inside the signal handler
would run collectives from an arbitrary point of the step and can hang or tear a checkpoint
(Lightning #21406), so the handler only sets a flag. At the next step boundary every rank agrees
on the flag, the periodic checkpoint callback saves synchronously and the trainer stops; once the
attempt has closed its MLflow run (KILLED: it stopped early), rank 0 requeues the SLURM job (at most
`cluster.max_requeues` times): `scontrol requeue` ends the job's processes at once, so it comes
last. The requeued job resumes from that checkpoint (`checkpoint.resume=last`), and the run id
inside it continues the same MLflow run.

A warning that comes before the ranks listen (SLURM sends it to the batch shell, which may be
while the ranks still start up, or before `srun` has started them) would be lost: the batch shell
also creates the file `$ULTRAMESH_PREEMPT_FILE` names, and rank 0 looks for it at every step
boundary too. The batch script removes it when an attempt starts.

Restarts by torchrun (`--max-restarts`) need one more thing, `isolate_restart_attempts`.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)
PREEMPT_SIGNAL = signal.SIGUSR1
PREEMPT_FILE_ENV = "ULTRAMESH_PREEMPT_FILE"  # set by the SLURM batch script (launch/templates)


class Preemption(pl.Callback):
    def __init__(self, saver: Any, *, max_requeues: int, signum: int = PREEMPT_SIGNAL,
                 flag_file: str | None = None):
        self.saver = saver  # PeriodicCheckpoint: save(trainer) returns once committed
        self.max_requeues = max_requeues
        self.signum = signum
        self.flag_file = flag_file if flag_file is not None else os.environ.get(PREEMPT_FILE_ENV)
        self.requested = False
        self.arrived_after: int | None = None  # the last step boundary before the signal came
        self.stopped = False  # this attempt ended early; the run is not finished
        self.requeued = False
        self._previous: Any = None
        self._step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.requested:  # nothing else here: see the module docstring
            self.arrived_after = self._step
        self.requested = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step  # a resumed attempt starts at its checkpoint's step
        self._previous = signal.signal(self.signum, self._handler)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.stopped or trainer.global_step == self._step:
            return  # still accumulating gradients: not a step boundary
        if (not self.requested and trainer.is_global_zero and self.flag_file
                and os.path.exists(self.flag_file)):
            self.requested, self.arrived_after = True, self._step
            log.warning("preemption requested before this attempt listened (%s exists)",
                        self.flag_file)
        self._step = trainer.global_step
        # The signal may reach ranks a step apart; all of them must save the same step.
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        url = self.saver.save(trainer)
        if trainer.is_global_zero:
            arrived = (f" (it came after step {self.arrived_after})"
                       if self.arrived_after is not None else "")
            log.warning("preemption signal%s: checkpoint step %d committed at %s; stopping",
                        arrived, trainer.global_step, url)
        self.stopped = True
        trainer.should_stop = True

    def requeue(self) -> bool:
        """Requeue the SLURM job this attempt stopped for, if it did and the cap allows; call it
        on rank 0 once everything the attempt reports is sent: SLURM ends the job's processes at
        once."""
        job = os.environ.get("SLURM_JOB_ID")
        if not self.stopped or not job:
            return False
        done = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if done >= self.max_requeues:
            log.warning("SLURM job %s was requeued %d times (cluster.max_requeues=%d): not again; "
                        "resume it with the same command", job, done, self.max_requeues)
            return False
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
            return False
        log.warning("SLURM job %s requeued (requeue %d of at most %d); it resumes from this "
                    "checkpoint", job, done + 1, self.max_requeues)
        self.requeued = True
        return True


def isolate_restart_attempts() -> None:
    """Give each torchrun restart its own key space in the agent's store.

    torchrun's workers join the process group through the agent's TCPStore, which outlives a
    restart, and torch adds no per-attempt prefix (`torch.distributed.rendezvous`: "We create a
    new TCPStore for every retry", which the c10d agent no longer does). A rank that starts its
    second attempt before its peers then reads their first attempt's addresses and gloo fails
    with "connection refused". Wrapping the env:// rendezvous keeps every attempt apart; the
    handler table is private, so this is guarded and does nothing where it changed.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from torch.distributed import PrefixStore

    # the module, not the function of the same name that torch.distributed exports
    rdzv = importlib.import_module("torch.distributed.rendezvous")
    handlers = getattr(rdzv, "_rendezvous_handlers", None)
    original = handlers.get("env") if isinstance(handlers, dict) else None
    if original is None or getattr(original, "ultramesh_attempts", False):
        return
    prefix = f"ultramesh/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def per_attempt(*args: Any, **kwargs: Any):
        for store, rank, world_size in original(*args, **kwargs):
            yield PrefixStore(prefix, store), rank, world_size

    per_attempt.ultramesh_attempts = True  # type: ignore[attr-defined]
    handlers["env"] = per_attempt
