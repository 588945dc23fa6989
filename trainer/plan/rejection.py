"""`Rejection`: why the planner will not run a mesh, as the config key to change."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rejection:
    """Why a plan cannot run: the config key to change, its value, and what is wrong."""

    key: str
    value: object
    why: str
    kind: str = "shape"  # "shape" (dims vs model / topology / batch), "link" or "memory"

    def __str__(self) -> str:
        return f"{self.key}={self.value}: {self.why}"
