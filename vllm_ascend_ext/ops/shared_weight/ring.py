"""The buffers one rank holds for a finalised series, and the broadcasts that refill them.

Prefetch step ``k``: ``k`` slots, not ``k + 1``; position ``p`` uses slot
``p % k``. Right after position ``p``'s matmul its slot is refilled with the
slot's next user (:func:`~.ring_index.next_prefetch_position`). Only the slots
this rank ever receives into are allocated, so it holds ``owned + used
slots`` processed layers. ``k = 0`` broadcasts synchronously at use into one
buffer. Every rank issues the same broadcast sequence (the owner of a position
sends from its resident buffer), so all ranks of the group must run the
series' layers in the same order, as they do under TP.
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError
from vllm_ascend_ext.ops.shared_weight.ring_index import (
    next_prefetch_position,
    owner_of_layer_idx,
    slot_of_position,
    slots_needed,
)
from vllm_ascend_ext.ops.slot_storage import SlotBuffer

__all__ = ["SlotRing"]


class SlotRing:
    """Owned layers' resident buffers, the ring slots, and what each slot holds.

    The counters record what the hooks really did (cheap; tests and
    benchmarks read them).
    """

    def __init__(
        self, series_name: str, group: Any, prefetch_step: int, start_layer: int,
        num_layers: int,
    ) -> None:
        self.series_name = series_name
        self.group = group
        self.world_size: int = group.world_size
        self.rank_in_group: int = group.rank_in_group
        self.prefetch_step = prefetch_step
        self.start_layer = start_layer
        self.num_layers = num_layers
        self.resident: dict[int, SlotBuffer] = {}  # position -> its own buffer
        self.slots: dict[int, SlotBuffer] = {}  # slot -> buffer (used slots only)
        records = max(prefetch_step, 1)
        self.slot_position: list[int] = [-1] * records  # rank-independent
        self.slot_work: list[Any] = [None] * records
        self.num_waits = 0
        self.num_prefetches = 0
        self.num_broadcasts = 0

    # ------------------------------------------------------------ layout

    def owner_of_position(self, position: int) -> int:
        return owner_of_layer_idx(self.start_layer + position, self.world_size)

    def owns_position(self, position: int) -> bool:
        return self.owner_of_position(position) == self.rank_in_group

    def allocate_slots(self, new_buffer: Callable[[], SlotBuffer]) -> None:
        needed = slots_needed(self.start_layer, self.num_layers, self.world_size,
                              self.rank_in_group, self.prefetch_step)
        for s in sorted(needed):
            self.slots[s] = new_buffer()

    def buffer_for(
        self, position: int, new_buffer: Callable[[], SlotBuffer]
    ) -> tuple[SlotBuffer, bool]:
        """Where ``position``'s tensors live on this rank, and whether they
        must be filled now (owned, or in the ring's initial fill)."""
        k = self.prefetch_step
        if self.owns_position(position):
            buf = self.resident[position] = new_buffer()
            return buf, True
        # the ring starts out holding positions 0..k-1
        return self.slots[slot_of_position(position, k)], k > 0 and position < k

    def start_filled(self) -> None:
        """After finalisation: slot ``s`` holds position ``s`` (``s < k``)."""
        if self.prefetch_step > 0:
            self.slot_position = list(range(self.prefetch_step))

    # ----------------------------------------------------------- runtime

    def _issue(self, position: int, slot: int, async_op: bool) -> Any:
        if self.world_size == 1:
            return None
        self.num_broadcasts += 1
        owner = self.owner_of_position(position)
        buf = self.resident[position] if owner == self.rank_in_group else self.slots[slot]
        return buf.broadcast(src=self.group.ranks[owner], group=self.group.device_group,
                             async_op=async_op)

    def wait(self, position: int) -> None:
        """Before ``position``'s matmul: its weights are present when this returns."""
        self.num_waits += 1
        k = self.prefetch_step
        if k == 0:
            if self.slot_position[0] != position:
                self._issue(position, 0, async_op=False)
                self.slot_position[0] = position
            return
        s = position % k
        held = self.slot_position[s]
        if held != position:
            raise SharedWeightError(
                f"series {self.series_name!r}: slot {s} holds the weights of position "
                f"{held} (layer {self.start_layer + held}), not of position {position} "
                f"(layer {self.start_layer + position}); the series' layers must run "
                "in order on every rank of the group"
            )
        work = self.slot_work[s]
        if work is not None:
            self.slot_work[s] = None
            work.wait()

    def prefetch_after(self, position: int) -> None:
        """After ``position``'s matmul: start refilling its slot with the next user."""
        self.num_prefetches += 1
        k = self.prefetch_step
        if k == 0:
            return
        q = next_prefetch_position(position, k, self.num_layers)
        if q == position:  # the slot's only user: it already holds the right data
            return
        s = position % k
        if self.slot_position[s] != position:
            raise SharedWeightError(
                f"series {self.series_name!r}: prefetch after position {position}, but "
                f"slot {s} holds position {self.slot_position[s]} (missing wait?)"
            )
        pending = self.slot_work[s]
        if pending is not None:
            pending.wait()
        self.slot_work[s] = self._issue(q, s, async_op=True)
        self.slot_position[s] = q

    def synchronize(self) -> None:
        """Wait for every outstanding broadcast."""
        for s, work in enumerate(self.slot_work):
            if work is not None:
                self.slot_work[s] = None
                work.wait()

    # ------------------------------------------------------------ memory

    @property
    def resident_bytes(self) -> int:
        """Real storage bytes of the owned buffers and the allocated slots."""
        return (sum(b.nbytes for b in self.resident.values())
                + sum(b.nbytes for b in self.slots.values()))
