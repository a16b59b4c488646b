"""Ownership and ring index arithmetic (pure functions, no tensors, no groups).

Positions are relative to the series' first layer: ``p = layer_idx -
start_layer``. The owner of a layer depends on its model layer index only, so a
rank knows at registration -- before ``start_layer`` is known -- which layers it
will never load; slots and prefetch targets use positions, so a series may
start at any layer index (later pipeline stages included).
"""

from __future__ import annotations

from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError

__all__ = [
    "next_prefetch_position",
    "owner_of_layer_idx",
    "slot_of_position",
    "slots_needed",
]


def owner_of_layer_idx(layer_idx: int, world_size: int) -> int:
    """Group rank that owns (stores and broadcasts) layer ``layer_idx``."""
    return layer_idx % world_size


def slot_of_position(position: int, prefetch_step: int) -> int:
    """Ring slot used by ``position`` (``k = 0`` has a single slot)."""
    return position % prefetch_step if prefetch_step > 0 else 0


def next_prefetch_position(
    position: int, prefetch_step: int, num_layers: int
) -> int | None:
    """Position whose weights refill slot ``position % k`` after ``position`` ran.

    The slot's next user is ``position + k`` while that is inside the series;
    past the end it is the slot's first user in the next forward pass,
    ``position % k``.  Staying inside the slot's residue class keeps the ring
    correct when ``num_layers % k != 0``.  ``k = 0`` prefetches nothing.
    """
    if not 0 <= position < num_layers:
        raise SharedWeightError(
            f"position {position} is outside a series of {num_layers} layers"
        )
    if prefetch_step == 0:
        return None
    nxt = position + prefetch_step
    return nxt if nxt < num_layers else position % prefetch_step


def slots_needed(
    start_layer: int, num_layers: int, world_size: int, rank: int, prefetch_step: int
) -> set[int]:
    """The slots ``rank`` ever receives into: those of the positions it does not own."""
    return {
        slot_of_position(p, prefetch_step)
        for p in range(num_layers)
        if owner_of_layer_idx(start_layer + p, world_size) != rank
    }
