"""`python -m trainer [overrides]`: compose -> validate -> plan -> build -> fit.

Every job of the command line (each combination of a `--multirun` sweep) is composed and checked
before Hydra runs anything, so a bad config costs one line on stderr and exit code 2, and leaves no
output directory, process group or MLflow run behind.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainer.config import CONFIG_DIR, CONFIG_ERRORS, compose, describe, validate

log = logging.getLogger("trainer")
EXIT_CONFIG_ERROR = 2
# Flags that only print (help, the composed config, shell completion): Hydra answers them itself.
_INFO_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "resolve")


def main() -> None:
    try:
        preflight(sys.argv[1:])
    except CONFIG_ERRORS as exc:
        print(f"config error: {describe(exc)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    _hydra_main()


def preflight(argv: list[str]) -> None:
    """Compose, validate and plan every job `argv` would run; raise the first config error."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in _INFO_FLAGS):
        return
    if args.config_name not in (None, "train") or args.config_path or args.config_dir:
        return  # a config tree of the user's own: Hydra composes it, validate() runs in the job
    from trainer.plan import plan

    for overrides in _jobs(args.overrides, multirun=args.multirun):
        plan(validate(compose(overrides)))  # a mesh that cannot work is a config error too


def _jobs(overrides: list[str], *, multirun: bool) -> list[list[str]]:
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> float | None:
    from trainer.data.format import DataError
    from trainer.fit import check_launchable, fit
    from trainer.tracking import SweepInfo

    try:
        run = validate(cfg)
        check_launchable(run)
    except CONFIG_ERRORS as exc:  # a config tree of the user's own, not checked in preflight
        print(f"config error: {describe(exc)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    hydra_cfg = HydraConfig.get()
    sweep = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = SweepInfo(sweep_dir=str(Path(hydra_cfg.sweep.dir).resolve()),
                          job_num=hydra_cfg.job.num)
    try:
        result = fit(
            run,
            run_dir=Path(hydra_cfg.runtime.output_dir),
            resolved=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
            overrides=list(hydra_cfg.overrides.task),
            sweep=sweep,
        )
    except (*CONFIG_ERRORS, DataError) as exc:  # found once the plan or the data were looked at
        print(f"config error: {describe(exc)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    # The return value is what Hydra's sweepers (e.g. Optuna) optimise.
    return result.metrics.get("train/loss")


if __name__ == "__main__":
    main()
