"""The slots FlashComm2's wide weights are gathered into, and the gathers that fill them.

Prefetch step ``k``: ``k`` slots; position ``p`` uses slot ``p % k``. Right
after position ``p``'s matmul, its slot starts gathering the slot's next
user (:func:`~vllm_ascend_ext.ops.shared_weight.ring_index.next_prefetch_position`),
so after a whole forward pass the ring again holds positions ``0..k-1``.
``k = 0`` gathers synchronously at use into one slot. Every position goes
through a slot (nobody owns a layer), and every rank of the ODP group issues
the same gathers in the same order, as the layers run under TP.

One slot holds, for each gathered attribute, the tensor FlashComm2 multiplies
with: the ODP group's shards concatenated along the sharded dim, laid out in
the same memory order as the shard (so a row-major ``[N, K/P]`` shard gives a
row-major ``[N, K*D/P]`` weight, exactly what FlashComm2 without o_shared
holds, and the matmul takes the same kernel path bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vllm_ascend_ext.ops.shared_weight.ring_index import (
    next_prefetch_position,
    slot_of_position,
)

__all__ = ["GatherRing", "ShardSource", "allocate_like"]


def _storage_order(t: torch.Tensor) -> list[int]:
    """Dims from outermost to innermost in memory (ties keep dim order)."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def allocate_like(shard: torch.Tensor, dim: int, factor: int) -> torch.Tensor:
    """A dense tensor like ``shard`` with ``dim`` ``factor`` times longer, in
    ``shard``'s memory order."""
    order = _storage_order(shard)
    shape = list(shard.shape)
    shape[dim] *= factor
    dense = torch.empty([shape[d] for d in order], dtype=shard.dtype, device=shard.device)
    return dense.permute([order.index(d) for d in range(shard.dim())])


@dataclass
class ShardSource:
    """One position's gathered attributes: this rank's shard of each."""

    shards: dict[str, torch.Tensor] = field(default_factory=dict)


class GatherRing:
    """Slots, what each holds, the gathers in flight, and counters of what ran."""

    def __init__(self, name: str, group: Any, prefetch_step: int, num_layers: int,
                 gathered_dims: dict[str, int]) -> None:
        self.name = name
        self.group = group  # the ODP GroupCoordinator
        self.world_size: int = group.world_size
        self.prefetch_step = prefetch_step
        self.num_layers = num_layers
        self.gathered_dims = gathered_dims  # attr -> sharded dim
        records = max(prefetch_step, 1)
        self.slots: list[dict[str, torch.Tensor]] = []  # allocated on the first source
        self.sources: list[ShardSource | None] = [None] * num_layers
        self.slot_position: list[int] = [-1] * records
        self.slot_work: list[Any] = [None] * records
        self.num_waits = 0
        self.num_prefetches = 0
        self.num_gathers = 0

    # ------------------------------------------------------------ set-up

    def add_source(self, position: int, source: ShardSource) -> dict[str, torch.Tensor]:
        """Record ``position``'s shards; returns its slot's tensors. Positions
        ``< k`` are gathered into their slot at once (the initial fill)."""
        if not self.slots:
            for _ in range(max(self.prefetch_step, 1)):
                self.slots.append({a: allocate_like(t, self.gathered_dims[a], self.world_size)
                                   for a, t in source.shards.items()})
        self.sources[position] = source
        slot = slot_of_position(position, self.prefetch_step)
        if position < self.prefetch_step:
            self._issue(position, slot, async_op=False)
            self.slot_position[slot] = position
        return self.slots[slot]

    # ----------------------------------------------------------- runtime

    def _issue(self, position: int, slot: int, async_op: bool) -> Any:
        self.num_gathers += 1
        source = self.sources[position]
        works = []
        for attr, full in self.slots[slot].items():
            outputs = list(full.chunk(self.world_size, self.gathered_dims[attr]))
            works.append(dist.all_gather(outputs, source.shards[attr],
                                         group=self.group.device_group, async_op=async_op))
        return works if async_op else None

    def wait(self, position: int) -> None:
        """Before ``position``'s matmul: its gathered weights are in its slot."""
        self.num_waits += 1
        slot = slot_of_position(position, self.prefetch_step)
        if self.prefetch_step == 0:
            if self.slot_position[0] != position:
                self._issue(position, 0, async_op=False)
                self.slot_position[0] = position
            return
        held = self.slot_position[slot]
        if held != position:
            raise RuntimeError(
                f"o_shared {self.name!r}: slot {slot} holds position {held}, not {position}; "
                "the o_proj layers must run in order on every rank of the ODP group")
        works = self.slot_work[slot]
        if works is not None:
            self.slot_work[slot] = None
            for w in works:
                w.wait()

    def prefetch_after(self, position: int) -> None:
        """After ``position``'s matmul: start gathering its slot's next user."""
        self.num_prefetches += 1
        if self.prefetch_step == 0:
            return
        nxt = next_prefetch_position(position, self.prefetch_step, self.num_layers)
        if nxt == position:
            return  # the slot's only user: it already holds the right weights
        slot = slot_of_position(position, self.prefetch_step)
        if self.slot_position[slot] != position or self.slot_work[slot] is not None:
            raise RuntimeError(
                f"o_shared {self.name!r}: prefetch after position {position} without its "
                "wait (the slot is still being filled, or holds another position)")
        self.slot_work[slot] = self._issue(nxt, slot, async_op=True)
        self.slot_position[slot] = nxt

    def synchronize(self) -> None:
        for slot, works in enumerate(self.slot_work):
            if works is not None:
                self.slot_work[slot] = None
                for w in works:
                    w.wait()

    def state(self) -> tuple:
        """Everything a step could change (the state-free tests compare it)."""
        return (tuple(self.slot_position), tuple(w is not None for w in self.slot_work),
                self.num_waits, self.num_prefetches, self.num_gathers)

    @property
    def slot_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for s in self.slots for t in s.values())
