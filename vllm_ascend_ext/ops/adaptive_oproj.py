"""Adaptive FlashComm2: plain TP's o_proj for small batches, FlashComm2 for large ones.

A FlashComm2 step reads the whole o_proj shard (``a/k`` input columns) on
every rank and pays an all-to-all and an all-gather where plain TP pays one
all-reduce: for a decode step that is ``P/k`` times plain TP's weight bytes.
So a forward pass with at most ``adaptive_tokens`` tokens runs plain TP's own
o_proj instead: the ``RowParallelLinear`` (``AscendRowParallelLinear`` on
Ascend) that vLLM built for the layer, which the FlashComm2 install keeps as
the layer's resident slice (``ops/resident_slice.py``), loaded from the same
checkpoint tensor and post-processed by its own quant method, all-reduce
included. The small side therefore equals plain TP by construction, reads
``a/P`` columns in the format its own kernel wants (oneDNN on vLLM CPU, NZ
on Ascend), and touches no o_shared ring. Larger passes run FlashComm2.

The decision is taken inside one custom op, ``flashcomm2_adaptive_oproj(x,
runtime index, sequence_parallel)`` (``ops/oproj_runtime.py``), that runs
either side eagerly: torch.compile sees one opaque call with a symbolic token
count, so it neither guards on the threshold nor recompiles when a batch
crosses it. The switch keeps no count
and no other Python state (``ops/side_counter.py`` counts where asked).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["adaptive_oproj", "switch_tokens"]


def switch_tokens(layer: Any, num_tokens: int) -> int:
    """The token count the switch compares with the threshold.

    Every member of an o_shared group must take the same side in a pass:
    one side broadcasts into the ring and the other does not. Inside one DP
    replica the TP ranks see the same batch; a group spanning DP replicas
    (MoE lockstep) sees one batch per replica, so there the largest batch
    across DP decides, as vLLM's own DP padding reads it."""
    if not layer.adaptive_dp_wide:
        return num_tokens
    from vllm_ascend_ext.compat import max_tokens_across_dp

    across = max_tokens_across_dp()
    if across is None:
        raise RuntimeError(
            f"{layer.prefix!r}: the o_shared group spans DP replicas, but this forward "
            "pass carries no DP token counts (vLLM's forward context has no dp_metadata), "
            "so the replicas cannot agree on a side of the adaptive switch")
    return max(across, num_tokens)


def adaptive_oproj(layer: Any, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The switch itself. Eager callers (o_shared's and Ascend's eager steps)
    call it directly; traced code goes through the custom op, whose dispatch
    costs more host time than the small side's whole Python path."""
    # No count kept here: a small step changes no Python state (it must
    # replay from a captured graph); ops/side_counter.py counts on request.
    if switch_tokens(layer, x.shape[0]) <= layer.adaptive_tokens:
        return layer.forward_row_parallel(x, sequence_parallel)
    return layer.forward_flashcomm2(x, sequence_parallel)[0]
