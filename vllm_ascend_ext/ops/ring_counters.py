"""What an o_shared store's hooks did, read from its ring (both storages)."""

from __future__ import annotations

__all__ = ["ring_counter"]


def ring_counter(name: str) -> property:
    """A store's view of its ring's counter ``name``: 0 until the ring exists
    (it is built when the weights are loaded). Tests and benchmarks read them."""

    def read(store) -> int:
        ring = store.ring
        return 0 if ring is None else getattr(ring, name)

    return property(read, doc=f"The ring's {name} (0 before loading).")
