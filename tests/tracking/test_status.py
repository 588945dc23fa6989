"""How an attempt ends, decided in one place (`trainer.tracking.status`); the runs in test_run.py
check the same statuses on a real server."""

from __future__ import annotations

import pytest
from pytorch_lightning.utilities.exceptions import SIGTERMException

from trainer.tracking import status


@pytest.mark.parametrize(("exception", "interrupted", "expected"), [
    (None, False, "FINISHED"),
    (None, True, "KILLED"),  # Lightning stopped the fit early
    (SIGTERMException(), False, "KILLED"),
    (KeyboardInterrupt(), False, "KILLED"),
    (RuntimeError("boom"), False, "FAILED"),
    (SystemExit(1), False, "FAILED"),
])
def test_an_attempt_ends_with_the_status_of_how_it_ended(exception, interrupted, expected):
    assert status.status_for(exception, interrupted=interrupted) == expected


def test_lightning_s_words_and_the_requeue_signal():
    assert status.status_for_lightning("success") == "FINISHED"
    assert status.status_for_lightning("failed") == "FAILED"
    assert status.status_for_lightning("finished") is None  # SLURM requeue: the run stays open


def test_exit_with_the_run_open_is_a_failure_unless_a_signal_ended_it():
    assert status.status_at_exit(None) == "FAILED"
    assert status.status_at_exit(KeyboardInterrupt()) == "KILLED"


def test_a_sweep_parent_stays_failed_once_a_job_failed():
    assert status.parent_status("FAILED", "FINISHED") is None
    assert status.parent_status("RUNNING", "FINISHED") == "FINISHED"
    assert status.parent_status("FINISHED", "FAILED") == "FAILED"
