"""`python -m trainer [overrides]`: compose -> validate -> plan -> build -> fit.

Every job of the command line is composed and checked before Hydra runs anything (the mesh, the
node count, this machine's devices, the dataset), so a bad config costs one line on stderr and exit
code 2, and leaves no output directory, process group or MLflow run behind. A `--multirun` sweep
of plain lists is checked job by job; sweep syntax only a sweeper plugin understands (Optuna's
`interval()`, tags) is checked with a representative value of each swept key, and the search
space a plugin's own config holds is checked by each job when it starts. An error only a job can
find still exits 2 in one line, and removes the output directory Hydra made for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainer.config import CONFIG_DIR, CONFIG_ERRORS, compose, exit_on_config_error, validate
from trainer.data import DataError

log = logging.getLogger("trainer")
# Flags that only print (help, the composed config, shell completion): Hydra answers them itself.
_INFO_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "resolve")
# A plain list sweep is checked job by job up to this many jobs (composing one takes ~50 ms);
# a larger one, or one under a sweeper plugin, value by value.
MAX_CHECKED_JOBS = 64


def main() -> None:
    try:
        with exit_on_config_error(DataError):
            preflight(sys.argv[1:])
        _hydra_main()
    except SystemExit as exc:  # a preempted, refused or failed job: keep its exit code
        _exit_before_gloo_teardown(exc.code)
        raise
    _exit_before_gloo_teardown(0)


# Thread names of torch's gloo backend (ProcessGroupGloo's work loops, gloo's TCP event loop).
_GLOO_THREADS = {"pt_gloo_runloop", "gloo_tcp_loop"}


def _exit_before_gloo_teardown(code: int | str | None) -> None:
    """End the process now, as `sys.exit(code)` would, if gloo's threads are still alive.

    `fit` destroys the process groups, yet the meshes keep the gloo backends (and their threads)
    alive until the interpreter tears down; a thread still joinable then aborts the process
    (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489, #179291)
    after the run succeeded, and a scheduler counts it failed (or a preempted job's 143 becomes
    134). Every result is written and the MLflow run closed by now, so the teardown is skipped:
    logs and streams are flushed and the process exits with `code`. (Linux only: the threads are
    read from /proc.)"""
    try:
        names = {(task / "comm").read_text().strip()
                 for task in Path("/proc/self/task").iterdir()}
    except OSError:
        return
    if not names & _GLOO_THREADS:
        return
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def preflight(argv: list[str]) -> None:
    """Compose, validate and check every job `argv` would run; raise the first config error."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in _INFO_FLAGS):
        return
    if args.config_name not in (None, "train") or args.config_path or args.config_dir:
        return  # a config tree of the user's own: Hydra composes it, the job checks it
    from trainer.preflight import check_startable

    for overrides in jobs_to_check(args.overrides, multirun=args.multirun):
        check_startable(validate(compose(overrides)))


def jobs_to_check(overrides: list[str], *, multirun: bool) -> list[list[str]]:
    """The command lines preflight composes for `overrides`: each job of a plain list sweep (as
    Hydra's basic sweeper would run them, up to MAX_CHECKED_JOBS); otherwise (a sweeper plugin,
    its syntax, or a larger sweep) one job per swept value with the other swept keys at their
    first value, which checks every listed value without the cross product."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if not sweeps:
        return [overrides]
    if all(o.is_discrete_sweep() for o in sweeps) and not _names_a_sweeper(parsed):
        with contextlib.suppress(HydraException):
            jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
            if len(jobs) <= MAX_CHECKED_JOBS:
                return jobs
    # a swept key without values to sample (a glob) keeps its default in the composed jobs
    choices = {i: values for i, o in enumerate(parsed)
               if o.is_sweep_override() and (values := _sample_values(o))}
    fixed = [(i, o) for i, o in enumerate(parsed) if not o.is_sweep_override() or i in choices]
    jobs = []
    for swept, values in choices.items():
        for value in values:
            jobs.append([f"{o.get_key_element()}={value if i == swept else choices[i][0]}"
                         if i in choices else o.input_line for i, o in fixed])
    unique = list(dict.fromkeys(map(tuple, jobs))) or [tuple(o.input_line for _, o in fixed)]
    return [list(job) for job in unique]


def _names_a_sweeper(parsed: list) -> bool:
    """Whether the command line picks a sweeper plugin (`hydra/sweeper=optuna`): its search space
    is its own, and preflight checks it value by value instead of as a cross product."""
    return any(o.key_or_group == "hydra/sweeper" and o.value() != "basic" for o in parsed
               if not o.is_sweep_override())


def _sample_values(override: Any) -> list[str]:
    """Values of one swept key to compose with: each listed one of a choice or range (a glob's
    choices are the group's options, which composition checks itself), the middle of an
    interval."""
    from hydra.core.override_parser.types import IntervalSweep

    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        middle = (sweep.start + sweep.end) / 2
        both_int = isinstance(sweep.start, int) and isinstance(sweep.end, int)
        return [str(int(middle) if both_int else middle)]
    if override.is_discrete_sweep():
        with contextlib.suppress(Exception):  # a glob needs the group's options to expand
            values = list(override.sweep_string_iterator())
            if values:
                return values[:MAX_CHECKED_JOBS]
    return []


@contextlib.contextmanager
def _nothing_left_behind(run_dir: Path) -> Iterator[None]:
    """An error found once Hydra made the job's directory removes what Hydra wrote there (its
    `.hydra` record, the log), so a refused run leaves no trace; anything else stays."""
    try:
        yield
    except (*CONFIG_ERRORS, DataError):
        logging.shutdown()  # closes the job log, so that it can go
        _remove_hydra_leftovers(run_dir)
        raise


def _remove_hydra_leftovers(run_dir: Path) -> None:
    leftovers = {".hydra", f"{HydraConfig.get().job.name}.log", "multirun.yaml"}
    cwd = Path.cwd().resolve()
    directory = run_dir.resolve()
    while directory != cwd and cwd in directory.parents and directory.is_dir():
        if any(p.name not in leftovers for p in directory.iterdir()):
            return
        shutil.rmtree(directory)
        directory = directory.parent


@contextlib.contextmanager
def _exit_on_lost_work() -> Iterator[None]:
    """A run whose last checkpoint did not commit exits 1 with one line saying what was lost
    (Hydra would print a traceback that says less)."""
    from trainer.checkpoint import CheckpointFailed

    try:
        yield
    except CheckpointFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> float | None:
    from trainer.fit import fit
    from trainer.tracking import SweepInfo

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = SweepInfo(sweep_dir=str(Path(hydra_cfg.sweep.dir).resolve()),
                          job_num=hydra_cfg.job.num)
    # validate() and fit()'s own checks again: a config tree of the user's own, or a sweeper
    # plugin's search space, was not checked in preflight
    with exit_on_config_error(DataError), _nothing_left_behind(run_dir), _exit_on_lost_work():
        result = fit(
            validate(cfg),
            run_dir=run_dir,
            resolved=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
            overrides=list(hydra_cfg.overrides.task),
            sweep=sweep,
        )
    # The return value is what Hydra's sweepers (e.g. Optuna) optimise.
    return result.metrics.get("train/loss")


if __name__ == "__main__":
    main()
