"""How far the planner's step-time model is from published training throughput.

For each figure in `published.py` the planner estimates the same configuration (the published
mesh, evaluated even where the planner would reject it, e.g. for memory) under the run's own
`plan.*` assumptions, and the error is estimate / published - 1. The MFU the published figure
implies (against the dense bf16 peak, with `flops_per_token`) says what `plan.mfu` would have to be
for a compute-bound plan to match it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from trainer.config import load
from trainer.plan.dims import ParallelDims
from trainer.plan.planner import RunFacts, evaluate
from trainer.plan.published import PUBLISHED, Published


@dataclass(frozen=True)
class Check:
    published: Published
    chips: int
    estimate_per_chip: float
    implied_mfu: float  # the published figure's MFU against the dense bf16 peak
    rejected: str | None  # why the planner itself would not choose this mesh, if it would not

    @property
    def error(self) -> float:
        return self.estimate_per_chip / self.published.tokens_per_s_per_chip - 1

    def to_dict(self) -> dict[str, Any]:
        p = self.published
        return {"label": p.label, "hardware": p.hardware, "source": p.source,
                "chips": self.chips, "mesh": ParallelDims.of(p.dims).mesh_str,
                "activation_checkpointing": p.activation_checkpointing,
                "precision": p.precision, "published_tokens_per_s_per_chip":
                p.tokens_per_s_per_chip, "estimate_tokens_per_s_per_chip":
                self.estimate_per_chip, "error": self.error, "implied_mfu": self.implied_mfu,
                "differs": p.differs, "planner_would_reject": self.rejected}


def check(entry: Published, assumptions: list[str]) -> Check:
    """The planner's estimate for one published configuration. `assumptions` are `plan.*`
    overrides (plan.mfu=..., plan.overlap=...), applied as the comparison applies them."""
    run = load([*entry.overrides, f"cluster.nodes={entry.nodes}", "tracking=none",
                *assumptions])
    facts = RunFacts.of(run)
    candidate = evaluate(facts, ParallelDims.of(entry.dims).shape, entry.activation_checkpointing)
    ranks_per_chip = run.hardware.ranks_per_chip
    chips = run.world_size // ranks_per_chip
    per_chip = candidate.estimate.tokens_per_s / chips
    model_flops = facts.costs.flops_per_token(run.data.seq_len)
    implied = entry.tokens_per_s_per_chip * model_flops / (run.hardware.peak_tflops_bf16 * 1e12)
    return Check(entry, chips, per_chip, implied,
                 str(candidate.reason) if candidate.reason else None)


@functools.lru_cache(maxsize=8)
def _calibrate(assumptions: tuple[str, ...]) -> tuple[Check, ...]:
    return tuple(check(entry, list(assumptions)) for entry in PUBLISHED)


def calibrate(assumptions: list[str]) -> list[Check]:
    """Every published figure against the model under `assumptions` (plan.* overrides)."""
    return list(_calibrate(tuple(assumptions)))


def summary(checks: list[Check], hardware: str) -> str:
    """One cell for the comparison table: the mean error of the bf16 figures on `hardware`, else
    of its FP8 figures (labelled), else that none is published."""
    mine = [c for c in checks if c.published.hardware == hardware]
    bf16 = [c.error for c in mine if c.published.precision == "bf16"]
    if bf16:
        return f"{sum(bf16) / len(bf16):+.0%} ({len(bf16)} bf16)"
    fp8 = [c.error for c in mine if c.published.precision == "fp8"]
    if fp8:
        return f"{sum(fp8) / len(fp8):+.0%} (vs fp8)"
    return "none published"
