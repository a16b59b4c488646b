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
layer_key, sequence_parallel)``, that runs either side eagerly: torch.compile
sees one opaque call with a symbolic token count, so it neither guards on the
threshold nor recompiles when a batch crosses it. The switch keeps no count
and no other Python state (``ops/side_counter.py`` counts where asked).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

from vllm_ascend_ext.custom_ops import register_custom_op
from vllm_ascend_ext.ops.flashcomm2_plan import padded_token_count

__all__ = [
    "adaptive_oproj",
    "lookup_adaptive_layer",
    "register_adaptive_layer",
]

_LAYERS: dict[str, weakref.ref] = {}
_keys = itertools.count()


def register_adaptive_layer(layer: Any) -> str:
    """Make ``layer`` reachable from the custom op; returns its key."""
    key = f"{getattr(layer, 'prefix', '') or type(layer).__name__}#{next(_keys)}"
    _LAYERS[key] = weakref.ref(layer)
    return key


def lookup_adaptive_layer(key: str) -> Any:
    ref = _LAYERS.get(key)
    layer = ref() if ref is not None else None
    if layer is None:
        raise RuntimeError(f"adaptive FlashComm2: o_proj {key!r} is not alive")
    return layer


# --------------------------------------------------------------------------
# the switch as a custom op
# --------------------------------------------------------------------------


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


def _adaptive_oproj(x: torch.Tensor, layer_key: str, sequence_parallel: bool) -> torch.Tensor:
    return adaptive_oproj(lookup_adaptive_layer(layer_key), x, sequence_parallel)


def adaptive_oproj(layer: Any, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The switch itself. Eager callers (o_shared's and Ascend's eager steps)
    call it directly; traced code goes through the custom op, whose dispatch
    costs more host time than the small side's whole Python path."""
    # No count kept here: a small step changes no Python state (it must
    # replay from a captured graph); ops/side_counter.py counts on request.
    if switch_tokens(layer, x.shape[0]) <= layer.adaptive_tokens:
        return layer.forward_row_parallel(x, sequence_parallel)
    return layer.forward_flashcomm2(x, sequence_parallel)[0]


def _adaptive_oproj_fake(x: torch.Tensor, layer_key: str,
                         sequence_parallel: bool) -> torch.Tensor:
    layer = lookup_adaptive_layer(layer_key)
    rows = x.shape[0]
    if sequence_parallel:
        P = layer.flashcomm2_tp_size
        rows = padded_token_count(rows, P) // P
    return x.new_empty((rows, layer.output_size))


register_custom_op("flashcomm2_adaptive_oproj", _adaptive_oproj, _adaptive_oproj_fake)
