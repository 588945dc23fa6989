"""How a run's ranks split into a device mesh, and whether the run fits: `MeshPlan` and the planner.

Pure arithmetic on the config (no torch.distributed); the command line is `python -m trainer.plan`
(`trainer/plan/__main__.py`).
"""

from trainer.plan.planner import (
    MeshPlan,
    Rejection,
    RunFacts,
    candidates,
    evaluate,
    explicit_dims,
    plan,
    preference,
)

__all__ = ["MeshPlan", "Rejection", "RunFacts", "candidates", "evaluate", "explicit_dims", "plan",
           "preference"]
