"""`python -m trainer.plan`: the planner's command line (table, JSON, full-scale validation).

It lives apart from the planner so that imports run one way: the planner is arithmetic that
`trainer.mesh`, the validation and the trainer import; this entry point imports them all.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import trainer.plan.precision as lowp
from trainer.config import (
    KEY,
    MESH_DIMS,
    RunConfig,
    compose,
    exit_on_config_error,
    validate,
)
from trainer.hardware import GIB
from trainer.plan.planner import (
    Candidate,
    RunFacts,
    all_candidates,
    choose,
    preference,
    resolve_precision,
)

USAGE = """\
usage: python -m trainer.plan [--all] [KEY=VALUE | GROUP=OPTION ...]
       python -m trainer.plan compare tokens=N [hardware=A,B,...] ...   (see compare --help)

Plan a run's device mesh without starting it. The arguments are the Hydra overrides `python -m
trainer` takes; the same config is composed and validated. Prints the candidate meshes
(dp_replicate x dp_shard x cp x tp, activation checkpointing) with the estimated memory per rank,
step time, tokens/s and MFU, and marks the plan the run would use: the explicit parallelism.* dims,
or with parallelism=auto the fastest feasible candidate.

  --all            also list rejected candidates, each with the reason
  plan.output=F    write the chosen plan as JSON to F
  plan.mfu=X       assumed fraction of peak FLOP/s compute reaches (default 0.4)
  plan.overlap=X   fraction of compute time FSDP traffic hides behind (default 1)
  plan.link_efficiency=X   fraction of nominal link bandwidth collectives reach (default 1)
  plan.memory_headroom=X   fraction of a rank's memory a plan may use (default 0.9)
  plan.validate=true       also build the mesh with a fake process group and check it
  trainer.precision=auto   plan in the fastest precision the hardware trains with

examples:
  python -m trainer.plan model=llama3_8b hardware=trn2_ultraserver cluster.nodes=4 \\
      parallelism=auto data.seq_len=8192 data.micro_batch_size=1 trainer.precision=bf16-mixed
  python -m trainer.plan model=llama3_70b hardware=h100 cluster.nodes=8 parallelism=fsdp_tp \\
      parallelism.tp=8 plan.output=plan.json

A plan that cannot run prints one line on stderr and exits with status 2."""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["compare"]:
        from trainer.plan.compare import main as compare

        return compare(args[1:])
    if {"-h", "--help"} & set(args):
        print(USAGE)
        return 0
    show_all = "--all" in args
    overrides = [a for a in args if a != "--all"]
    with exit_on_config_error():
        asked = validate(compose(overrides))
        run = resolve_precision(asked)
        facts = RunFacts.of(run)
        found = sorted(all_candidates(facts), key=lambda c: (not c.feasible, preference(c)))
        chosen = choose(run)
    print_table(run, found, chosen, show_all=show_all)
    if facts.has_experts:
        print(expert_summary(run, facts, chosen))
    if asked.trainer.precision != run.trainer.precision:
        print(f"precision: {run.trainer.precision} ({KEY.trainer.precision}="
              f"{asked.trainer.precision}: the fastest of {', '.join(lowp.options(asked))} on "
              f"{run.hardware.name})")
    if not getattr(facts.costs, "estimates_activations", True):
        print(f"activations are not in these figures: {KEY.model._target_}="
              f"{run.model._target_} is planned from its parameter count alone "
              f"({KEY.plan.validate}=true measures a training step)")
    if run.plan.validate:
        # torch and a fake process group: only when asked for, after the table is out
        from trainer.validate_plan import PlanValidationError
        from trainer.validate_plan import validate as validate_plan

        with exit_on_config_error():
            try:
                print(validate_plan(run, chosen).render())
            except PlanValidationError as exc:
                if exc.report is not None:  # the figures, then the one-line refusal
                    print(exc.report.render())
                raise
    if run.plan.output:
        write_json(run, chosen, Path(run.plan.output))
        print(f"wrote {run.plan.output}")
    return 0


def expert_summary(run: RunConfig, facts: RunFacts, chosen: Candidate) -> str:
    """Total against active parameters, and what expert parallel costs the chosen plan."""
    costs, e = facts.costs, chosen.estimate

    def count(n: int) -> str:
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    return (f"{run.model.name}: {count(costs.num_params())} parameters, "
            f"{count(costs.active_params())} active per token ({costs.top_k} of "
            f"{costs.n_experts} experts); FLOPs, MFU and step time count the active ones. "
            f"Chosen ep={chosen.dims.ep}: all-to-all {e.time['ep']:.3g} s per step over the "
            f"{e.links['ep']} link, routing assumed to load the busiest expert rank "
            f"{run.plan.expert_load}x the mean ({KEY.plan.expert_load}).")


def write_json(run: RunConfig, chosen: Candidate, path: Path) -> None:
    document = {"hardware": run.hardware.name, "model": run.model.name,
                "nodes": run.cluster.nodes, "ranks_per_node": run.ranks_per_node,
                "parallelism": run.parallelism.name, **chosen.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def print_table(run: RunConfig, found: list[Candidate], chosen: Candidate, *,
                show_all: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = [c for c in found if c.feasible or show_all]
    title = (f"{run.model.name} on {run.cluster.nodes} x {run.hardware.name}: {run.world_size} "
             f"ranks, {run.ranks_per_node} per node; seq_len {run.data.seq_len}, micro batch "
             f"{run.data.micro_batch_size}, {run.trainer.precision}")
    table = Table(title=title, title_justify="left")
    # a model with experts gets expert parallel's column and link (ep borrows dp_shard's ranks)
    experts = any(c.dims.ep > 1 for c in found)
    link_names = ("tp", "fsdp", "dp_replicate", *(("ep",) if experts else ()))
    links_header = "links " + "/".join(link_names).replace("dp_replicate", "rep")
    for header in ("", *MESH_DIMS, *(("ep",) if experts else ()), "AC", "GiB/rank", "step s",
                   "tokens/s", "MFU", links_header, "status"):
        table.add_column(header, justify="left" if header in ("", "status") else "right")
    for c in shown:
        d, e = c.dims, c.estimate
        mark = "->" if c == chosen else ""
        links = "/".join(e.links[name] for name in link_names)
        table.add_row(mark, *map(str, d.shape), *((str(d.ep),) if experts else ()),
                      "on" if d.activation_checkpointing else "off",
                      f"{e.memory_bytes_per_rank / GIB:.1f}", f"{e.step_seconds:.3g}",
                      f"{e.tokens_per_s:,.0f}", f"{e.mfu:.1%}", links,
                      "ok" if c.feasible else str(c.reason),
                      style="bold green" if c == chosen else None)
    console = Console(width=shutil.get_terminal_size(fallback=(200, 24)).columns)
    console.print(table)
    rejected = sum(not c.feasible for c in found)
    if rejected and not show_all:
        console.print(f"{rejected} of {len(found)} candidates rejected; --all lists them with "
                      f"the reason")
    how = "auto: fastest feasible" if run.parallelism.name == "auto" else "explicit"
    console.print(f"chosen ({how}): {chosen.dims.mesh_str} "
                  f"({' x '.join(MESH_DIMS)}{', ep of dp_shard' if experts else ''}), "
                  f"activation checkpointing "
                  f"{'on' if chosen.dims.activation_checkpointing else 'off'}")


if __name__ == "__main__":
    sys.exit(main())
