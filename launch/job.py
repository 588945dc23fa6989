"""What every launcher shares: the checked run, where its outputs go, and the trainer's command.

A job is rendered from the same composed config `python -m trainer` would run, after the same
validation and mesh plan, so a config that cannot train is refused here, before anything is
submitted. The trainer gets the user's overrides back unchanged, plus three that make restarts
work: a fixed output directory (Hydra's default is a new timestamped one per start, which would
hide the checkpoints from a restarted rank), `checkpoint.resume=last`, and the rendered file.
"""

from __future__ import annotations

import datetime
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from trainer.config import KEY, ConfigError, RunConfig, compose, validate
from trainer.plan import ParallelDims, choose
from trainer.xla import compile_pass_overrides, runtime_env, wants_compile_pass

TEMPLATES = Path(__file__).resolve().parent / "templates"
# launch.* keys steer the launcher; the trainer only needs the one the launcher sets itself.
_LAUNCHER_ONLY = (KEY.launch.dry_run, KEY.launch.max_restarts, KEY.launch.run_dir,
                  KEY.launch.wait, KEY.launch.rendered, "hydra.")


@dataclass
class Job:
    run: RunConfig
    dims: ParallelDims
    overrides: list[str]  # as the user gave them
    run_dir: Path
    name: str  # scheduler-safe job name
    # Where the user ran the launcher; every node starts the trainer there, so relative paths in
    # the overrides (data.path=data/mine) mean what they meant to the user.
    workdir: Path

    @property
    def nodes(self) -> int:
        return self.run.cluster.nodes

    @property
    def ranks_per_node(self) -> int:
        return self.run.ranks_per_node

    def trainer_overrides(self, rendered: str, run_dir: str | None = None) -> list[str]:
        kept = [o for o in self.overrides if not _key(o).startswith(_LAUNCHER_ONLY)]
        extra = [f"hydra.run.dir={run_dir or self.run_dir}",
                 f"{KEY.launch.rendered}={rendered}"]
        if not any(_key(o) == KEY.checkpoint.resume for o in kept):
            extra.insert(0, f"{KEY.checkpoint.resume}=last")
        return kept + extra

    def trainer_args(self, rendered: str, run_dir: str | None = None) -> str:
        """`-m trainer <overrides>`, quoted for a shell."""
        return " ".join(["-m", "trainer", *map(shlex.quote,
                                               self.trainer_overrides(rendered, run_dir))])

    @property
    def env(self) -> dict[str, str]:
        """Exported on every node: the hardware's launch environment, then the XLA path's."""
        return {**self.run.hardware.launch_env, **runtime_env(self.run)}

    def compile_pass_args(self, rendered: str, run_dir: str | None = None) -> str | None:
        """`-m trainer <overrides>` of Neuron's ahead-of-time compile pass, which
        `neuron_parallel_compile` runs before training; None when the run has none."""
        if not wants_compile_pass(self.run):
            return None
        extra = compile_pass_overrides(self.run, str(run_dir or self.run_dir))
        return " ".join([self.trainer_args(rendered, run_dir), *map(shlex.quote, extra)])


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def prepare(overrides: list[str]) -> Job:
    """Compose, validate and plan as `python -m trainer` does; raise the first config error."""
    run = validate(compose(overrides))
    dims = choose(run).dims
    if dims.world_size != run.cluster.nodes * run.ranks_per_node:
        raise ConfigError("cluster.nodes", run.cluster.nodes,
                          f"{run.cluster.nodes} node(s) x {run.ranks_per_node} rank(s) per node "
                          f"does not match the mesh's world size {dims.world_size}")
    now = datetime.datetime.now()
    workdir = Path.cwd()
    run_dir = Path(run.launch.run_dir or workdir / "outputs" / "launch"
                   / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")).resolve()
    name = f"{run.model.name}-{run.hardware.name}-{now.strftime('%m%d-%H%M%S')}"
    return Job(run, dims, list(overrides), run_dir, _dns_name(name), workdir)


def _dns_name(text: str) -> str:
    """A Kubernetes object name (RFC 1123 label): lower case, digits and '-', at most 63."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return out[:52].rstrip("-")  # room for suffixes a controller adds (-node-0-0, -worker-12)


class _Dumper(yaml.SafeDumper):
    """Block YAML a person reads: no anchors for repeated values, scripts as `|` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text and not any(line != line.rstrip() for line in text.split("\n")) \
        else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(value: Any) -> str:
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def _to_yaml(value: Any, indent: int = 0) -> str:
    """A nested value as block YAML, indented to sit under a key at `indent` columns."""
    text = to_yaml(value).rstrip()
    pad = " " * indent
    return "\n".join(pad + line if line else line for line in text.splitlines())


def render(template: str, **context: Any) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["yaml"] = _to_yaml
    env.filters["q"] = shlex.quote
    return env.get_template(template).render(**context)


def save(job: Job, file_name: str, text: str) -> Path:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    path = job.run_dir / file_name
    path.write_text(text)
    return path
