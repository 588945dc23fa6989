"""`python -m trainer.plan compare`: where should one training job run?

For each hardware in the catalog that is asked about, the planner's best plan at a fleet size
(given; the smallest that fits; the smallest that meets a deadline; or the fastest a budget pays
for), and what the job then costs: days to the token budget, chip-hours, energy and money, with
every power and price figure from the catalog (nf where unpublished, never guessed) and the
step-time model's error against published throughput beside it.

The arithmetic, for a plan of N nodes reaching T tokens/s on a budget of B tokens:

    seconds    = B / T                       days = seconds / 86,400
    chip-hours = N x chips per node x seconds / 3,600
    energy     = N x node power x seconds x plan.pue      (node power: the published server
                 figure, else chips x the chip's published power; nf if neither is published)
    cost       = N x on-demand price per node-hour x seconds / 3,600
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer.config import CONFIG_ERRORS, ConfigError, RunConfig, describe, load
from trainer.hardware import HardwareSpec, catalog
from trainer.models.registry import model_costs
from trainer.plan.calibration import Check, calibrate, summary
from trainer.plan.dims import ParallelDims
from trainer.plan.planner import Candidate, choose

USAGE = """\
usage: python -m trainer.plan compare tokens=N [hardware=A,B,...]
           [chips=N | days=D | budget=USD] [max_chips=N] [--output FILE.json|FILE.csv]
           [--chart FILE.png] [HW.KEY=VALUE ...] [KEY=VALUE | GROUP=OPTION ...]

Compare hardware for one training job: per hardware, the best plan the planner finds and the
days, chip-hours, energy (MWh) and on-demand cost to train on `tokens` tokens, with tokens per
MWh and per dollar. Figures that are not published show as nf.

  tokens=N       the token budget (required), e.g. tokens=15e12
  hardware=A,B   catalog entries (default: trn2_ultraserver,trn3_ultraserver,h100,h200,b200,
                 gb200_nvl72; `all` for the whole catalog)
  chips=N        fleet size, rounded up to whole nodes
  days=D         the smallest fleet that finishes within D days
  budget=USD     the fastest fleet whose on-demand cost is at most USD
                 (none of the three: the smallest fleet that fits)
  max_chips=N    the largest fleet searched (default 16384, the size of Llama 3 405B's
                 training fleet)
  HW.KEY=VALUE   a figure for one entry only, e.g. trn3_ultraserver.power_w=1000 or
                 h100.price_per_hour=40 (hardware.KEY=VALUE sets it for every entry)
  --output F     also write the comparison as JSON (F.json) or CSV (F.csv)
  --chart F      draw days vs cost, one point per hardware, as a PNG
  plan.pue=X plan.mfu=X plan.overlap=X plan.link_efficiency=X   the model's assumptions

Any other argument is a Hydra override, as for `python -m trainer`; the comparison starts from
parallelism=auto data.seq_len=8192 data.micro_batch_size=1 trainer.precision=bf16-mixed
parallelism.param_dtype=bfloat16. With tracking on (tracking=mlflow, the default) the table,
JSON and chart are logged to MLflow as one run.

example:
  python -m trainer.plan compare model=llama3_70b tokens=15e12 days=90 --chart days_vs_cost.png

Bad input prints one line on stderr and exits with status 2."""

DEFAULT_HARDWARE = ("trn2_ultraserver", "trn3_ultraserver", "h100", "h200", "b200",
                    "gb200_nvl72")
# What large runs use: one 8k sequence per rank, bf16 compute, FSDP gathering bf16 weights.
PRESET = ("parallelism=auto", "data.seq_len=8192", "data.micro_batch_size=1",
          "trainer.precision=bf16-mixed", "parallelism.param_dtype=bfloat16")
# Llama 3 405B was trained on up to 16K H100 GPUs (Llama 3 paper, arXiv 2407.21783, sec. 3.3):
# the largest fleet a published run of this model family used.
MAX_CHIPS = 16384
NF = "nf"
SECONDS_PER_DAY = 86_400
_OWN_KEYS = ("tokens", "hardware", "chips", "days", "budget", "max_chips")


@dataclass(frozen=True)
class Request:
    """What the command line asks for."""

    tokens: float
    hardware: tuple[str, ...] = DEFAULT_HARDWARE
    chips: int | None = None
    days: float | None = None
    budget: float | None = None
    max_chips: int = MAX_CHIPS
    output: Path | None = None
    chart: Path | None = None
    overrides: tuple[str, ...] = ()
    per_hardware: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        if self.chips is not None:
            return f"chips={self.chips}"
        if self.days is not None:
            return f"days={self.days:g}"
        if self.budget is not None:
            return f"budget={self.budget:g}"
        return "smallest fleet that fits"


def _number(key: str, text: str, kind: type = float) -> Any:
    try:
        value = kind(float(text)) if kind is int else kind(text)
    except ValueError:
        raise ConfigError(key, text, f"must be a {'whole ' if kind is int else ''}number") from None
    if kind is int and value != float(text):
        raise ConfigError(key, text, "must be a whole number")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, text, "must be positive")
    return value


def parse(args: Sequence[str]) -> Request:
    """The request a command line makes; ConfigError names the argument that is wrong."""
    args = list(args)
    files: dict[str, Path] = {}
    for flag in ("--output", "--chart"):
        while flag in args:
            at = args.index(flag)
            if at + 1 >= len(args):
                raise ConfigError(flag, None, "needs a file name")
            files[flag] = Path(args.pop(at + 1))
            args.pop(at)
    own: dict[str, str] = {}
    overrides: list[str] = []
    per_hw: dict[str, list[str]] = {}
    known = set(catalog())
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in _OWN_KEYS:
            own[key] = value
        elif sep and "." in key and key.split(".", 1)[0] in known:
            name, sub = key.split(".", 1)
            per_hw.setdefault(name, []).append(f"hardware.{sub}={value}")
        elif arg.startswith("-"):
            raise ConfigError(arg, None, "unknown option; allowed: --output FILE, --chart FILE")
        else:
            overrides.append(arg)
    if "tokens" not in own:
        raise ConfigError("tokens", None, "required: the token budget, e.g. tokens=15e12")
    hardware = DEFAULT_HARDWARE
    if "hardware" in own:
        names = [n.strip() for n in own["hardware"].split(",") if n.strip()]
        if not names:
            raise ConfigError("hardware", own["hardware"], "name one catalog entry or more, or all")
        hardware = tuple(sorted(known)) if names == ["all"] else tuple(names)
        for name in hardware:
            if name not in known:
                raise ConfigError("hardware", name,
                                  f"not in the catalog (configs/hardware/); allowed: "
                                  f"{', '.join(sorted(known))}, or all")
    for name in per_hw:
        if name not in hardware:
            raise ConfigError(f"{name}.*", None, f"{name} is not among hardware="
                                                 f"{','.join(hardware)}")
    sizing = [k for k in ("chips", "days", "budget") if k in own]
    if len(sizing) > 1:
        raise ConfigError(sizing[1], own[sizing[1]],
                          f"give one of chips, days, budget (also given: {sizing[0]})")
    for flag, path in files.items():
        allowed = (".json", ".csv") if flag == "--output" else (".png",)
        if path.suffix.lower() not in allowed:
            raise ConfigError(flag, str(path), f"must end in {' or '.join(allowed)}")
    return Request(
        tokens=_number("tokens", own["tokens"]), hardware=hardware,
        chips=_number("chips", own["chips"], int) if "chips" in own else None,
        days=_number("days", own["days"]) if "days" in own else None,
        budget=_number("budget", own["budget"]) if "budget" in own else None,
        max_chips=_number("max_chips", own["max_chips"], int) if "max_chips" in own
        else MAX_CHIPS,
        output=files.get("--output"), chart=files.get("--chart"), overrides=tuple(overrides),
        per_hardware={k: tuple(v) for k, v in per_hw.items()})


# ---------------------------------------------------------------------------------------------
# The arithmetic


@dataclass(frozen=True)
class JobFigures:
    """What running `tokens` tokens at `tokens_per_s` on `nodes` nodes takes. None = nf."""

    seconds: float
    chip_hours: float
    energy_mwh: float | None
    cost_usd: float | None

    @property
    def days(self) -> float:
        return self.seconds / SECONDS_PER_DAY


def job_figures(tokens: float, tokens_per_s: float, nodes: int, chips_per_node: int,
                node_power_w: float | None, pue: float,
                price_per_node_hour: float | None) -> JobFigures:
    seconds = tokens / tokens_per_s
    hours = seconds / 3600
    energy = None if node_power_w is None else nodes * node_power_w * seconds * pue / 3.6e9
    cost = None if price_per_node_hour is None else nodes * price_per_node_hour * hours
    return JobFigures(seconds, nodes * chips_per_node * hours, energy, cost)


# ---------------------------------------------------------------------------------------------
# Fleet sizes


def node_grid(nodes_per_domain: int, max_nodes: int) -> list[int]:
    """Node counts searched: every count to 16, then steps of at most 25% (8, 10, 12, 14 x 2^k),
    and whole domains (UltraServers, NVL72 racks) of those counts."""
    counts = set(range(1, 17)) | {k << j for k in (8, 10, 12, 14) for j in range(24)}
    if nodes_per_domain > 1:
        counts |= {m * nodes_per_domain for m in set(counts)}
    return sorted(n for n in counts if n <= max_nodes)


def _at(run: RunConfig, nodes: int) -> tuple[Candidate | None, str | None]:
    sized = replace(run, cluster=replace(run.cluster, nodes=nodes))
    try:
        return choose(sized), None
    except ConfigError as exc:
        return None, str(exc)


@dataclass
class Row:
    """One hardware's answer. Figures are None where they are nf or no plan was found."""

    hardware: str
    instance_type: str
    chips_per_node: int
    mfu_assumed: float
    power_w: float | None
    node_power_w: float | None
    power_basis: str
    price_per_node_hour: float | None
    price_date: str | None
    price_region: str | None
    calibration: str
    vendor_claims: list[str]
    nodes: int | None = None
    chosen: Candidate | None = None
    figures: JobFigures | None = None
    reason: str | None = None

    @property
    def chips(self) -> int | None:
        return None if self.nodes is None else self.nodes * self.chips_per_node

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.chosen is None else self.chosen.estimate.tokens_per_s

    def to_dict(self, tokens: float) -> dict[str, Any]:
        f = self.figures
        return {
            "hardware": self.hardware, "instance_type": self.instance_type,
            "nodes": self.nodes, "chips": self.chips,
            "mesh": self.chosen.dims.mesh_str if self.chosen else None,
            "activation_checkpointing": (self.chosen.dims.activation_checkpointing
                                         if self.chosen else None),
            "mfu_assumed": self.mfu_assumed,
            "mfu": self.chosen.estimate.mfu if self.chosen else None,
            "tokens_per_s": self.tokens_per_s,
            "days": f.days if f else None, "chip_hours": f.chip_hours if f else None,
            "energy_mwh": f.energy_mwh if f else None, "cost_usd": f.cost_usd if f else None,
            "tokens_per_mwh": tokens / f.energy_mwh if f and f.energy_mwh else None,
            "tokens_per_usd": tokens / f.cost_usd if f and f.cost_usd else None,
            "power_w_per_chip": self.power_w, "node_power_w": self.node_power_w,
            "power_basis": self.power_basis, "price_per_node_hour": self.price_per_node_hour,
            "price_date": self.price_date, "price_region": self.price_region,
            "calibration_error": self.calibration, "reason": self.reason,
            "vendor_claims": self.vendor_claims}


def compare_one(request: Request, name: str, checks: list[Check]) -> Row:
    run = load([*PRESET, f"hardware={name}", *request.overrides,
                *request.per_hardware.get(name, ())])
    hw = HardwareSpec(run.hardware)
    c = run.hardware
    row = Row(name, c.instance_type, c.chips_per_node, run.plan.mfu,
              c.power_w, hw.node_power_w, hw.power_basis, hw.price_per_node_hour, c.price_date,
              c.price_region, summary(checks, name), list(c.vendor_claims))

    def figures(p: Candidate, nodes: int) -> JobFigures:
        return job_figures(request.tokens, p.estimate.tokens_per_s, nodes, c.chips_per_node,
                           hw.node_power_w, run.plan.pue, hw.price_per_node_hour)

    if request.chips is not None:
        nodes = math.ceil(request.chips / c.chips_per_node)
        found, why = _at(run, nodes)
        if found is None:
            row.reason = f"no plan at {nodes * c.chips_per_node} chips: {why}"
            return row
        row.nodes, row.chosen, row.figures = nodes, found, figures(found, nodes)
        return row
    if request.budget is not None and hw.price_per_node_hour is None:
        row.reason = (f"budget needs a price; {name}'s is nf (set "
                      f"{name}.price_per_hour=USD per {c.instance_type} hour)")
        return row
    grid = node_grid(c.nodes_per_domain, max(1, request.max_chips // c.chips_per_node))
    # No plan beats every rank computing at plan.mfu of its peak with nothing else to do: fleets
    # below that bound cannot meet a deadline, and no fleet can be cheaper than it.
    ceiling = (hw.peak_flops_per_rank() * hw.ranks_per_node * run.plan.mfu
               / model_costs(run).flops_per_token(run.data.seq_len))  # tokens/s per node
    if request.days is not None:
        fewest = request.tokens / (request.days * SECONDS_PER_DAY * ceiling)
        grid = [n for n in grid if n >= math.floor(fewest)] or grid[-1:]
    if request.budget is not None:
        floor = request.tokens / ceiling * hw.price_per_node_hour / 3600  # type: ignore[operator]
        if floor > request.budget:
            row.reason = (f"budget={request.budget:,.0f} buys no plan: even at plan.mfu="
                          f"{run.plan.mfu:g} with no communication the job costs "
                          f"${floor:,.0f}")
            return row
    best: tuple[int, Candidate, JobFigures] | None = None  # fastest seen, for the reason
    cheapest: tuple[int, Candidate, JobFigures] | None = None
    last_why = None
    for nodes in grid:
        found, why = _at(run, nodes)
        if found is None:
            last_why = why
            continue
        fig = figures(found, nodes)
        if request.days is None and request.budget is None:
            row.nodes, row.chosen, row.figures = nodes, found, fig
            return row
        if request.days is not None and fig.days <= request.days:
            row.nodes, row.chosen, row.figures = nodes, found, fig
            return row
        if request.budget is not None and fig.cost_usd is not None:
            if cheapest is None or fig.cost_usd < cheapest[2].cost_usd:  # type: ignore[operator]
                cheapest = (nodes, found, fig)
            if fig.cost_usd <= request.budget and (best is None or fig.seconds < best[2].seconds):
                best = (nodes, found, fig)
        elif best is None or fig.seconds < best[2].seconds:
            best = (nodes, found, fig)
    limit = f"up to {request.max_chips} chips"
    if request.budget is not None:
        if best is not None:
            row.nodes, row.chosen, row.figures = best
        elif cheapest is not None:
            row.reason = (f"budget={request.budget:,.0f} buys no plan: the cheapest is "
                          f"${cheapest[2].cost_usd:,.0f} at {cheapest[0] * c.chips_per_node} "
                          f"chips")
        else:
            row.reason = f"no plan fits {limit}: {last_why}"
        return row
    if request.days is not None and best is not None:
        row.reason = (f"no fleet {limit} finishes in {request.days:g} days; the fastest takes "
                      f"{best[2].days:,.0f} days at {best[0] * c.chips_per_node} chips")
        return row
    row.reason = f"no plan fits {limit}: {last_why}"
    return row


def compare(request: Request) -> tuple[list[Row], list[Check]]:
    assumptions = [o for o in request.overrides if o.startswith("plan.")]
    checks = calibrate(assumptions)
    return [compare_one(request, name, checks) for name in request.hardware], checks


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, spec: str = ",.0f", prefix: str = "") -> str:
    return NF if value is None else f"{prefix}{value:{spec}}"


def _si(value: float | None) -> str:
    if value is None:
        return NF
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def render(request: Request, rows: list[Row], checks: list[Check], run_label: str,
           pue: float, width: int | None = None) -> str:
    """The comparison, its sources and the calibration as Rich tables; returns the plain text
    that was printed (for the MLflow artifact)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True,
                      width=width or shutil.get_terminal_size(fallback=(200, 24)).columns)
    title = (f"{run_label}, {request.tokens:.3g} tokens; fleet: {request.mode}; energy = node "
             f"power x time x PUE {pue:g} (plan.pue)")
    table = Table(title=title, title_justify="left")
    for header in ("hardware", "chips", "mesh, AC", "MFU", "tokens/s", "days", "chip-hours",
                   "MWh", "cost $", "tokens/MWh", "tokens/$", "calib. err"):
        table.add_column(header, justify="left" if header in ("hardware", "mesh, AC") else "right")
    for r in rows:
        f = r.figures
        if r.chosen is None or f is None:
            table.add_row(r.hardware, "", "no plan (below)", f"{r.mfu_assumed:.0%}", "", "", "",
                          "", "", "", "", r.calibration)
            continue
        dims = r.chosen.dims
        mesh = f"{dims.mesh_str}, {'on' if dims.activation_checkpointing else 'off'}"
        table.add_row(r.hardware, f"{r.chips:,}", mesh, f"{r.chosen.estimate.mfu:.1%}",
                      _si(r.tokens_per_s), f"{f.days:,.1f}", _si(f.chip_hours),
                      _fmt(f.energy_mwh, ",.0f"), _fmt(f.cost_usd, ",.0f", "$"),
                      _si(request.tokens / f.energy_mwh) if f.energy_mwh else NF,
                      _si(request.tokens / f.cost_usd) if f.cost_usd else NF, r.calibration)
    console.print(table)
    for r in rows:
        if r.reason:
            console.print(f"{r.hardware}: {r.reason}")
    assumed = rows[0].mfu_assumed if rows else math.nan
    console.print(f"MFU: the plan's model FLOPs over dense bf16 peak, assuming plan.mfu="
                  f"{assumed:g} (less with activation checkpointing's recompute); mesh "
                  f"dp_replicate x dp_shard x cp x tp in ranks.")

    sources = Table(title="power and price (configs/hardware/*.yaml, each with its source)",
                    title_justify="left")
    for header in ("hardware", "instance", "W per chip", "W per node (basis)", "$ per node-hour",
                   "price date", "region"):
        sources.add_column(header, justify="left" if header in ("hardware", "instance",
                                                                 "price date", "region")
                           else "right")
    for r in rows:
        sources.add_row(r.hardware, r.instance_type, _fmt(r.power_w),
                        f"{_fmt(r.node_power_w)} ({r.power_basis})",
                        _fmt(r.price_per_node_hour, ",.2f", "$"), r.price_date or NF,
                        r.price_region or NF)
    console.print(sources)
    claims = [(r.hardware, c) for r in rows for c in r.vendor_claims]
    for name, claim in claims:
        console.print(f"vendor claim, not used in any figure ({name}): {claim}")

    calib = Table(title="calibration: the step-time model against published throughput "
                        "(estimate / published - 1)", title_justify="left")
    for header in ("published run", "hardware", "chips", "mesh, AC", "precision",
                   "published tok/s/chip", "estimate", "error", "published MFU"):
        calib.add_column(header, justify="left" if header in ("published run", "hardware",
                                                               "mesh, AC", "precision")
                         else "right")
    for c in checks:
        p = c.published
        ac = "on" if p.activation_checkpointing else "off"
        mesh = ParallelDims.of(p.dims).mesh_str
        calib.add_row(p.label, p.hardware, f"{c.chips:,}", f"{mesh}, {ac}",
                      p.precision, f"{p.tokens_per_s_per_chip:,.0f}",
                      f"{c.estimate_per_chip:,.0f}", f"{c.error:+.1%}", f"{c.implied_mfu:.1%}")
    console.print(calib)
    console.print("sources and differences: docs/planning.md; published MFU is against the "
                  "dense bf16 peak, so FP8 runs can exceed what a bf16 plan.mfu reaches.")
    return console.export_text()


def document(request: Request, rows: list[Row], checks: list[Check],
             assumptions: dict[str, Any]) -> dict[str, Any]:
    req = asdict(request)
    req.update(output=str(request.output) if request.output else None,
               chart=str(request.chart) if request.chart else None)
    return {"request": req, "assumptions": assumptions,
            "rows": [r.to_dict(request.tokens) for r in rows],
            "calibration": [c.to_dict() for c in checks]}


def write_output(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return
    rows = doc["rows"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: NF if v is None else ("; ".join(v) if isinstance(v, list) else v)
                             for k, v in row.items()})


def draw_chart(path: Path, request: Request, rows: list[Row], run_label: str) -> None:
    """Days (x) against cost (y), one point per hardware that has a plan. Hardware whose price
    is nf has no height: it sits in a band under the axis, one line each, at its days."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed = [(r, r.figures) for r in rows if r.figures is not None]
    priced = sorted(((r, f) for r, f in placed if f.cost_usd is not None),
                    key=lambda item: item[1].cost_usd)  # type: ignore[arg-type,return-value]
    unpriced = [(r, f) for r, f in placed if f.cost_usd is None]
    top = max((f.cost_usd / 1e6 for _, f in priced), default=1.0)  # type: ignore[operator]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    markers = "osD^v<>p*h"
    for i, (r, f) in enumerate(priced):
        ax.scatter(f.days, f.cost_usd / 1e6, s=70, marker=markers[i % len(markers)],  # type: ignore
                   zorder=3, label=f"{r.hardware}, {r.chips:,} chips")
    step = 0.09 * top
    for i, (r, f) in enumerate(unpriced):
        ax.scatter(f.days, -step * (i + 1), s=60, marker="x", zorder=3,
                   label=f"{r.hardware}, {r.chips:,} chips (price nf: under the axis)")
    ax.legend(fontsize=8, loc="upper right")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylim(-step * (len(unpriced) + 1), top * 1.2)
    ax.set_yticks([t for t in ax.get_yticks() if t >= 0])
    days = [f.days for _, f in placed] or [1.0]
    ax.set_xlim(min(days) * 0.8, max(days) * 1.35)
    ax.set_xlabel("days to the token budget")
    ax.set_ylabel("on-demand cost, million USD")
    ax.set_title(f"{run_label}, {request.tokens:.3g} tokens: days vs cost ({request.mode})",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(args: Sequence[str]) -> int:
    if {"-h", "--help"} & set(args):
        print(USAGE)
        return 0
    try:
        request = parse(args)
        base = load([*PRESET, *request.overrides])
        rows, checks = compare(request)
    except CONFIG_ERRORS as exc:
        print(f"config error: {describe(exc)}", file=sys.stderr)
        return 2
    if all(r.chosen is None for r in rows):
        print(f"config error: {request.mode}: no plan on any of {', '.join(request.hardware)}; "
              f"{rows[0].hardware}: {rows[0].reason}", file=sys.stderr)
        return 2
    label = f"{base.model.name}, seq {base.data.seq_len}"
    text = render(request, rows, checks, label, base.plan.pue)
    assumptions = {"mfu": base.plan.mfu, "overlap": base.plan.overlap,
                   "link_efficiency": base.plan.link_efficiency, "pue": base.plan.pue,
                   "model": base.model.name, "seq_len": base.data.seq_len,
                   "micro_batch_size": base.data.micro_batch_size,
                   "global_batch_size": base.data.global_batch_size,
                   "precision": base.trainer.precision}
    doc = document(request, rows, checks, assumptions)
    if request.output:
        write_output(request.output, doc)
        print(f"wrote {request.output}")
    if request.chart:
        draw_chart(request.chart, request, rows, label)
        print(f"wrote {request.chart}")
    if base.tracking.backend == "mlflow":
        _log(base, request, rows, doc, text, label)
    return 0


def _log(base: RunConfig, request: Request, rows: list[Row], doc: dict[str, Any], text: str,
         label: str) -> None:
    from trainer.tracking import TrackingUnavailable, log_comparison

    params = {"tokens": f"{request.tokens:g}", "hardware": ",".join(request.hardware),
              "fleet": request.mode, "model": base.model.name,
              **{f"plan.{k}": str(v) for k, v in doc["assumptions"].items()
                 if k in ("mfu", "overlap", "link_efficiency", "pue")}}
    metrics = {f"{row['hardware']}.{key}": row[key] for row in doc["rows"]
               for key in ("chips", "tokens_per_s", "days", "chip_hours", "energy_mwh",
                           "cost_usd", "tokens_per_mwh", "tokens_per_usd")
               if row[key] is not None}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "comparison.txt").write_text(text)
        write_output(folder / "comparison.json", doc)
        write_output(folder / "comparison.csv", doc)
        draw_chart(folder / "days_vs_cost.png", request, rows, label)
        try:
            run_id, hint = log_comparison(base.tracking, f"compare {base.model.name}", params,
                                          metrics, sorted(folder.iterdir()))
        except TrackingUnavailable as exc:
            print(f"warning: MLflow unreachable, comparison not logged: {exc}", file=sys.stderr)
            return
    print(f"MLflow run {run_id}: {hint}")
