"""What is logged once per run: the resolved config as params, the config and overrides as
artifacts, and tags that say where the run ran and from which code. Built before the run opens,
already redacted."""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from trainer.tracking.redact import Redactor

if TYPE_CHECKING:
    from trainer.config import RunConfig

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[2]
# Kubernetes sets no job-name variable by itself; the rendered manifest passes the Job's
# `job-name` label in through the downward API under this name.
K8S_JOB_NAME_ENV = "K8S_JOB_NAME"
TRUNCATED = "...[truncated; full value in config/resolved.yaml]"


@dataclass(frozen=True)
class SweepInfo:
    """The Hydra multirun a job belongs to: one parent run per `sweep_dir`, one child per job."""

    sweep_dir: str
    job_num: int


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; lists and empty mappings stay leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def param_text(value: Any, limit: int) -> str:
    """A config value as it would read in YAML (`null`, `true`, `[1, 2]`), cut to `limit`."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATED)] + TRUNCATED


def config_params(resolved: Mapping[str, Any], redactor: Redactor) -> dict[str, str]:
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    params = {}
    for key, value in flatten(resolved).items():
        if len(key) > MAX_ENTITY_KEY_LENGTH:
            log.warning("config key %s... is longer than MLflow allows; it is only in the artifact",
                        key[:80])
            continue
        params[key] = redactor.value(key, param_text(value, MAX_PARAM_VAL_LENGTH))
    return params


def git_tags(repo: Path = REPO_DIR) -> dict[str, str]:
    """The commit the code runs from and whether the work tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {}
    # mlflow.source.git.commit is the tag the MLflow UI shows as the run's source version
    return {"mlflow.source.git.commit": commit, "git.commit": commit,
            "git.dirty": str(dirty).lower()}


def job_tags(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Scheduler identities: where to look when a run needs explaining."""
    tags = {}
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        tags["slurm.job_id"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    elif env.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = env["SLURM_JOB_ID"]
    for tag, name in (("slurm.restart_count", "SLURM_RESTART_COUNT"),
                      ("k8s.job_name", K8S_JOB_NAME_ENV),
                      ("torchrun.restart_count", "TORCHELASTIC_RESTART_COUNT")):
        if env.get(name):
            tags[tag] = env[name]
    return tags


def source_tags(argv: list[str] | None = None, env: Mapping[str, str] = os.environ
                ) -> dict[str, str]:
    """The program that ran (`python -m trainer`), without its arguments (they are in the
    overrides artifact), and whether a scheduler started it: the UI's "Source"."""
    argv = list(argv if argv is not None else getattr(sys, "orig_argv", sys.argv))
    program = argv[: argv.index("-m") + 2] if "-m" in argv else argv[:2]
    name = " ".join([Path(program[0]).name, *program[1:]]) if program else "python"
    scheduled = any(env.get(v) for v in ("SLURM_JOB_ID", K8S_JOB_NAME_ENV))
    return {"mlflow.source.name": name, "mlflow.source.type": "JOB" if scheduled else "LOCAL"}


def mesh_text(mesh_shape: Mapping[str, int]) -> str:
    """`2x4x8 (dp_replicate x dp_shard x tp)`: the shape, then what each factor is."""
    return f"{'x'.join(map(str, mesh_shape.values()))} ({' x '.join(mesh_shape)})"


def run_tags(run: RunConfig, mesh_shape: Mapping[str, int],
             env: Mapping[str, str] = os.environ) -> dict[str, str]:
    tags = {
        "hardware": run.hardware.name,
        "instance_type": run.hardware.instance_type,
        "world_size": str(run.world_size),
        "mesh": mesh_text(mesh_shape),
        "model": run.model.name,
        "mlflow.user": getpass.getuser(),
    }
    if not run.uses_family_model:
        tags["model.target"] = run.model._target_
    return {**tags, **source_tags(env=env), **git_tags(), **job_tags(env)}


def default_run_name(run: RunConfig, sweep: SweepInfo | None) -> str:
    name = run.tracking.run_name or f"{run.model.name}-{run.hardware.name}-{run.world_size}r"
    return f"{name}-job{sweep.job_num}" if sweep else name


@dataclass
class RunRecord:
    """Everything logged once per attempt, already redacted."""

    name: str
    params: dict[str, str]
    tags: dict[str, str]
    artifacts: dict[str, str]  # path inside the run's artifacts -> text

    @classmethod
    def build(cls, run: RunConfig, *, resolved_config: Mapping[str, Any], overrides: list[str],
              mesh_shape: Mapping[str, int], sweep: SweepInfo | None,
              launch_artifact: tuple[str, str] | None, redactor: Redactor) -> RunRecord:
        artifacts = {
            "config/resolved.yaml": yaml.safe_dump(redactor.tree(dict(resolved_config)),
                                                   sort_keys=False),
            "config/overrides.yaml": yaml.safe_dump([redactor.text(o) for o in overrides]),
        }
        if launch_artifact:
            file_name, text = launch_artifact
            artifacts[f"launch/{file_name}"] = redactor.text(text)
        tags = {key: redactor.value(key, value)
                for key, value in run_tags(run, mesh_shape).items()}
        return cls(default_run_name(run, sweep), config_params(resolved_config, redactor), tags,
                   artifacts)
