"""The end status of an attempt, and of a sweep's parent run: decided here and nowhere else.

MLflow knows FINISHED, FAILED and KILLED. An attempt ends FINISHED when training returned, KILLED
on SIGTERM (Lightning turns it into `SIGTERMException`), SIGINT (`KeyboardInterrupt`) or a fit
Lightning reports as interrupted, and FAILED on any other exception or when the interpreter exits
with the run still open.
"""

from __future__ import annotations

from pytorch_lightning.utilities.exceptions import SIGTERMException

RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
STATUSES = (FINISHED, FAILED, KILLED)  # the ends; RUNNING is while training


def status_for(exception: BaseException | None, *, interrupted: bool = False) -> str:
    """The status of an attempt that ended with `exception` (None: training returned, and
    `interrupted` says whether Lightning stopped it early)."""
    if exception is None:
        return KILLED if interrupted else FINISHED
    if isinstance(exception, SIGTERMException | KeyboardInterrupt):
        return KILLED
    return FAILED


def status_for_lightning(status: str) -> str | None:
    """Lightning's end-of-fit word (`Logger.finalize`) as a status; None for "finished": SLURM's
    requeue signal, after which training goes on until SIGTERM, so the run stays open."""
    return {"success": FINISHED, "failed": FAILED}.get(status)


def status_at_exit(uncaught: BaseException | None) -> str:
    """The interpreter is exiting with the run still open: an exception nobody caught, or a
    trainer that never closed its run (which did not finish properly either)."""
    return status_for(uncaught) if uncaught is not None else FAILED


def parent_status(parent_now: str, job: str) -> str | None:
    """A sweep's parent shows FAILED once any job failed, else the latest job's status; None
    leaves it as it is."""
    return None if parent_now == FAILED else job
