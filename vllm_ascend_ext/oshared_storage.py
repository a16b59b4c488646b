"""Which storage o_shared uses: TP shards or round-robin whole layers.

- **TP shards** (``ops/tp_shard/``): every rank keeps plain TP's o_proj,
  ``L * W / P`` bytes; a FlashComm2 step all-gathers the ODP group's shards
  into a ring slot. Small (adaptive) steps run plain TP from the shard.
- **Round-robin** (``ops/shared_weight/``, upstream's layout): layer ``i``
  whole on rank ``i % n`` of the o_shared group, broadcast into the ring;
  ``L * W / n`` bytes, plus plain TP's shards when the adaptive switch is on.

Round-robin stores less only when both hold: the o_shared group spans DP
replicas (``n > P``, MoE lockstep) and the threshold is 0 (no plain-TP shard
is needed, e.g. a prefill-only ``kv_producer``). Everywhere else TP shards
store as little or less, and their all-gather spreads the traffic over every
rank where the broadcast sends a whole layer from one owner.

Pure: no torch, no vLLM (the planner imports it too).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AUTO", "ROUND_ROBIN", "STORAGES", "TP_SHARD", "StorageChoice", "choose_storage"]

AUTO = "auto"
TP_SHARD = "tp_shard"
ROUND_ROBIN = "round_robin"
#: What the setting accepts.
STORAGES = (AUTO, TP_SHARD, ROUND_ROBIN)


@dataclass(frozen=True)
class StorageChoice:
    storage: str  # TP_SHARD or ROUND_ROBIN
    reason: str


def choose_storage(setting: str, *, adaptive_tokens: int, oshared_group_size: int,
                   tp_size: int, gather_spec: str | None, quant_method: str) -> StorageChoice:
    """``setting``: the user's value (AUTO, TP_SHARD or ROUND_ROBIN);
    ``gather_spec``: who declares what to gather for this quant method, or None.

    Raises ``ValueError`` where TP shards are asked for but the quant method
    declares nothing to gather (the caller names the setting)."""
    if setting == ROUND_ROBIN:
        return StorageChoice(ROUND_ROBIN, "asked for")
    if setting == TP_SHARD:
        if gather_spec is None:
            raise ValueError(
                f"TP-shard storage needs a quant method that declares which processed "
                f"tensors to gather, and {quant_method} declares none")
        return StorageChoice(TP_SHARD, "asked for")
    if adaptive_tokens == 0 and oshared_group_size > tp_size:
        return StorageChoice(
            ROUND_ROBIN,
            f"the o_shared group ({oshared_group_size} ranks) spans DP replicas and the "
            f"adaptive threshold is 0, so no plain-TP shard is needed: round-robin holds "
            f"1/{oshared_group_size} of each o_proj, TP shards 1/{tp_size}")
    if gather_spec is None:
        return StorageChoice(
            ROUND_ROBIN,
            f"{quant_method} declares no tensors to gather from TP shards")
    return StorageChoice(
        TP_SHARD,
        f"plain TP's shards ({gather_spec}) are what {'small steps run and ' if adaptive_tokens else ''}"
        f"the all-gather reads; round-robin would store "
        f"{'the same or more' if adaptive_tokens == 0 else 'plain TP shards plus owned layers'}")
