"""What one rank spends on a series, next to full replication and the floor."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SharedWeightMemoryReport"]


@dataclass(frozen=True)
class SharedWeightMemoryReport:
    """Bytes one rank spends on a series, next to full replication and the floor."""

    num_layers: int
    world_size: int
    prefetch_step: int
    per_layer_bytes: int  # one layer's buffer (= one slot), real storage bytes
    owned_layers: int
    slots: int  # ring buffers allocated on this rank
    resident_bytes: int  # owned packed layers + allocated slots
    replicated_bytes: int  # num_layers * per_layer_bytes
    floor_bytes: float  # num_layers * per_layer_bytes / world_size

    @staticmethod
    def mib(nbytes: float) -> float:
        return nbytes / (1 << 20)
