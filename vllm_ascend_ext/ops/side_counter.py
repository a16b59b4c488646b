"""Which side of adaptive FlashComm2 ran, counted only where someone asks.

The switch itself keeps no count. A small step must change no Python state:
a captured graph replays it without running any Python, so a count kept
there would be wrong after capture, and the step would not be state-free
(``tests/test_tp_shard_storage.py`` checks that it is). Tests and
diagnostics that want the count wrap one layer's two sides here, on the
instance, once the model is built; every call through the switch (eager, or
from inside its custom op) then goes through the wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SideCounts", "count_sides", "side_counts"]

_COUNTS_ATTR = "adaptive_side_counts"


@dataclass
class SideCounts:
    """Calls per side of one layer's switch since counting began."""

    flashcomm2: int = 0
    row_parallel: int = 0


def side_counts(layer: Any) -> SideCounts | None:
    """The layer's counts, or None where nobody asked for them."""
    return layer.__dict__.get(_COUNTS_ATTR)


def count_sides(layer: Any) -> SideCounts:
    """Start counting ``layer``'s calls per side (idempotent); returns the
    counts, which the wrappers update in place."""
    counts = side_counts(layer)
    if counts is not None:
        return counts
    counts = SideCounts()
    large, small = layer.forward_flashcomm2, layer.forward_row_parallel

    def forward_flashcomm2(x, sp):
        counts.flashcomm2 += 1
        return large(x, sp)

    def forward_row_parallel(x, sp):
        counts.row_parallel += 1
        return small(x, sp)

    # Instance attributes shadow the class's methods for this layer only.
    layer.__dict__["forward_flashcomm2"] = forward_flashcomm2
    layer.__dict__["forward_row_parallel"] = forward_row_parallel
    layer.__dict__[_COUNTS_ATTR] = counts
    return counts
