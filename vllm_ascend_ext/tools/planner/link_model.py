"""A link between ranks: what a collective or a broadcast of some bytes costs.

The one timing rule the capacity planner (whether o_shared's transfer hides
behind compute) and the step model (throughput of each configuration) share: a
collective costs its bytes per rank over the rate plus a fixed latency.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BROADCAST_SHAPES", "LinkModel"]

#: How one layer's broadcast reaches the group: "flat" (gloo: the owner sends
#: W to each other rank in turn) or "pipelined" (HCCL / NCCL rings: every
#: rank takes W in once).
BROADCAST_SHAPES = ("flat", "pipelined")


@dataclass(frozen=True)
class LinkModel:
    rate_bytes_per_s: float
    latency_s: float = 150e-6  # one small gloo collective over a veth
    hidden: float = 0.0  # share of o_shared's broadcast hidden behind compute
    broadcast: str = "flat"  # one of BROADCAST_SHAPES

    def __post_init__(self) -> None:
        if self.broadcast not in BROADCAST_SHAPES:
            raise ValueError(f"broadcast={self.broadcast!r}: expected 'flat' or 'pipelined'")

    def transfer_s(self, nbytes: float) -> float:
        """Time ``nbytes`` take at the link rate, without the latency."""
        return nbytes / self.rate_bytes_per_s

    def collectives_s(self, bytes_per_rank: float, count: int) -> float:
        """``count`` collectives moving ``bytes_per_rank`` in all (ranks send concurrently)."""
        return self.transfer_s(bytes_per_rank) + count * self.latency_s

    def all_gather_s(self, nbytes: float, group_size: int) -> float:
        """One all-gather that leaves ``nbytes`` on every rank of a group: each
        rank sends and receives ``(n-1)/n`` of it at once (full duplex), and
        the part not hidden behind compute adds to the step."""
        share = nbytes * (group_size - 1) / group_size
        return self.latency_s + (1 - self.hidden) * self.transfer_s(share)

    def broadcast_s(self, nbytes: float, group_size: int) -> float:
        """One broadcast of ``nbytes`` to a group: latency plus the part of the
        transfer not hidden behind compute."""
        fan_out = group_size - 1 if self.broadcast == "flat" else 1
        return self.latency_s + (1 - self.hidden) * self.transfer_s(nbytes * fan_out)
