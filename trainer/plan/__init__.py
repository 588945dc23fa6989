"""How a run's ranks split into a device mesh, and whether the run fits: `MeshPlan` and the planner.

Pure arithmetic on the config (no torch.distributed); the command line is `python -m trainer.plan`
(`trainer/plan/__main__.py`).
"""

from trainer.plan.mesh_plan import MESH_DIMS, MeshPlan, Rejection
from trainer.plan.planner import (
    RunFacts,
    candidates,
    evaluate,
    explicit_dims,
    plan,
    preference,
)

__all__ = ["MESH_DIMS", "MeshPlan", "Rejection", "RunFacts", "candidates", "evaluate",
           "explicit_dims", "plan", "preference"]
