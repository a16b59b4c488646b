"""The one error a shared-weight series raises when it is used against its rules.

Kept apart so that modules the series itself calls (``ops/cpu_int8.py``) can
raise it without importing the series.
"""

from __future__ import annotations

__all__ = ["SharedWeightError"]


class SharedWeightError(ValueError):
    """A shared-weight series was used against its rules."""
