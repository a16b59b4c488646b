"""The planner's one error: a model or a parallel layout it cannot plan."""

from __future__ import annotations

__all__ = ["PlanError"]


class PlanError(ValueError):
    """The model or the parallel layout cannot be planned (message says why)."""
