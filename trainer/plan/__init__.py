"""How a run's ranks split into a device mesh, and whether the run fits: `ParallelDims` (the mesh),
the planner's `Estimate` of it, and `choose(run)`, which returns the `Candidate` a run uses.

Pure arithmetic on the config (no torch.distributed); the command line is `python -m trainer.plan`
(`trainer/plan/__main__.py`), whose assumptions are the config's `plan.*` keys.
"""

from trainer.plan.dims import ParallelDims
from trainer.plan.planner import (
    Candidate,
    Estimate,
    RunFacts,
    all_candidates,
    candidates,
    choose,
    evaluate,
    explicit_shape,
    preference,
)
from trainer.plan.rejection import Rejection

__all__ = ["Candidate", "Estimate", "ParallelDims", "Rejection", "RunFacts", "all_candidates",
           "candidates", "choose", "evaluate", "explicit_shape", "preference"]
