"""Adaptive FlashComm2: plain row-parallel o_proj for small batches, from the same weights.

With ``k = 1`` every rank holds the whole o_proj, so a FlashComm2 decode step
reads ``P`` times the weight bytes plain TP reads, and pays an all-to-all and
an all-gather where plain TP pays one all-reduce. For a forward pass with at
most ``adaptive_tokens`` tokens the layer therefore runs as vLLM's
``RowParallelLinear`` would: this TP rank's ``a/P`` input columns times the
matching columns of the weight it already holds, then the TP all-reduce
through vLLM's own ``GroupCoordinator``. Larger passes run FlashComm2.

Which columns: TP rank ``r = j*D + i`` holds OTP shard ``j`` (input columns
``[j*a/k, (j+1)*a/k)``), and its own heads are columns ``[r*a/P, (r+1)*a/P)``
= local columns ``[i*a/P, (i+1)*a/P)`` of that shard. How the matmul reads
them depends on what the processed weight is (:func:`row_parallel_forward`):

- a plain ``[h, a/k]`` tensor (unquantized; on vLLM CPU o_shared members and
  every layer under the switch keep one, see ``keep_weight_sliceable``): a
  column view, no copy;
- o_shared's plain int8 ``[a/k, h]`` weight on vLLM CPU (``cpu_int8``): a row
  view, and the activations quantized per token over the ``a/P`` columns, as
  plain TP's kernel does;
- anything opaque (vLLM CPU's oneDNN or AMX-packed int8, torch_npu's NZ
  format, any other quant method): the input zero-padded to the shard's
  ``a/k`` columns through the layer's own ``quant_method.apply``. The zeros add
  exact zeros to every sum and leave per-token absmax scales unchanged, so the
  result is the slice's (vllm-ascend's W8A8-static quantizes with an offset,
  under which a float zero is not an int8 zero: there the slice is quantized
  first and padded with int8 zeros, which its ``apply`` takes as is); it reads the whole shard (no weight-bytes saving, but
  still one all-reduce instead of two collectives). No weight is copied.

Per-layer additive terms follow plain TP's rule on this side: TP rank 0 adds
the bias and vllm-ascend's ``quant_bias``.

The decision is taken inside one custom op, ``flashcomm2_adaptive_oproj(x,
layer_key, sequence_parallel)``, that runs either side eagerly: torch.compile
sees one opaque call with a symbolic token count, so it neither guards on the
threshold nor recompiles when a batch crosses it. o_shared's wait / prefetch
run inside the op, in the same order as without the switch.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from vllm_ascend_ext.custom_ops import register_custom_op
from vllm_ascend_ext.ops.flashcomm2_plan import padded_token_count
from vllm_ascend_ext.ops.resident_slice import resident_slice_of, run_resident_slice

__all__ = [
    "SMALL_SIDE_ROUTES",
    "adaptive_oproj",
    "lookup_adaptive_layer",
    "register_adaptive_layer",
    "row_parallel_forward",
    "small_side_route",
]

#: How the small-batch side reads this rank's columns (see the module docstring).
SMALL_SIDE_ROUTES = ("column view", "int8 row view", "zero-padded input")
#: o_shared members under the switch: plain TP's own o_proj, kept resident.
RESIDENT_SLICE_ROUTE = "resident slice"

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
# the small-batch side
# --------------------------------------------------------------------------


def _rank0_bias(layer: Any) -> torch.Tensor | None:
    if layer.bias is None or layer.flashcomm2_tp_rank != 0:
        return None
    return layer.bias


def _plain_weight(layer: Any) -> torch.Tensor | None:
    """The ``[h, a/k]`` weight when it is a plain tensor an unquantized matmul uses."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if type(layer.quant_method) is not UnquantizedLinearMethod:
        return None
    weight = getattr(layer, "weight", None)
    if weight is None or tuple(weight.shape) != (layer.output_size, layer.input_size_per_partition):
        return None  # e.g. vLLM CPU's oneDNN-packed weight (an empty placeholder)
    if weight.device.type == "npu":
        return None  # NZ: a column slice is not a view
    return weight


def _plain_int8_route(layer: Any):
    from vllm_ascend_ext.ops.cpu_int8 import int8_kernel_of

    kernel = int8_kernel_of(layer)
    if kernel is None or getattr(kernel.linear_method, "int8_input_matmul", None) is None:
        return None
    return kernel


def _apply_as_plain_tp(layer: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from vllm_ascend_ext.ops.quant_terms import takes_rank

    method = layer.quant_method
    if takes_rank(method):  # vllm-ascend: quant_bias on TP rank 0, as plain TP
        return method.quant_method.apply(layer, x, bias, layer.flashcomm2_tp_rank)
    return method.apply(layer, x, bias)


def _small_side(layer: Any) -> tuple[str, Any]:
    """(route, what it needs): the plain weight, the CPU int8 kernel, or for
    the zero-padded input vllm-ascend's static quantizer (else None).

    Fixed once the weights are processed; kept on the layer after the first
    call, which always runs eagerly (inside the custom op, or introspection)."""
    cached = layer.__dict__.get("_small_side")
    if cached is not None:
        return cached
    weight = _plain_weight(layer)
    if weight is not None:
        side = (SMALL_SIDE_ROUTES[0], weight)
    elif (kernel := _plain_int8_route(layer)) is not None:
        side = (SMALL_SIDE_ROUTES[1], kernel)
    else:
        from vllm_ascend_ext.ops.int8_all_to_all import int8_input_of

        # vllm-ascend quantizes with an offset: a float zero would become
        # ``offset`` on every rank, which plain TP's quant_bias (rank 0
        # only) cancels once. Quantize this rank's columns; pad in int8.
        int8_in = int8_input_of(layer)
        static = int8_in if int8_in is not None and int8_in.route == "ascend-static" else None
        side = (SMALL_SIDE_ROUTES[2], static)
    layer.__dict__["_small_side"] = side
    return side


def small_side_route(layer: Any) -> str:
    """Which of :data:`SMALL_SIDE_ROUTES` ``layer``'s processed weight allows
    (``"resident slice"``: o_shared's plain-TP layer, ``ops/resident_slice.py``)."""
    if resident_slice_of(layer) is not None:
        return RESIDENT_SLICE_ROUTE
    return _small_side(layer)[0]


def row_parallel_forward(layer: Any, x: torch.Tensor, sp: bool) -> torch.Tensor:
    """``x`` ``[T, a/P]`` -> ``[T, h]`` (or this rank's padded token block with
    ``sp``), as a row-parallel linear over the TP group."""
    if resident_slice_of(layer) is not None:
        # o_shared with a resident slice: plain TP's own layer; the ring is
        # not touched, so the pass moves no o_shared bytes.
        return run_resident_slice(layer, x, sp)
    a_local = layer.input_size_per_tp_rank
    i = layer.flashcomm2_odp_group.rank_in_group
    tp = layer.flashcomm2_tp_group
    if sp:
        # Token blocks of the padded count, as FlashComm2's (padding rows
        # come out as the bias there too).
        num_tokens = x.shape[0]
        x = F.pad(x, (0, 0, 0, padded_token_count(num_tokens, tp.world_size) - num_tokens))
    lo, hi = i * a_local, (i + 1) * a_local
    series = getattr(layer, "shared_weight_series", None)
    if series is not None:
        series.wait(layer, x)
    bias = _rank0_bias(layer)
    if bias is not None and series is not None:
        bias = bias.clone()  # lives in the ring slot the prefetch refills

    route, needs = _small_side(layer)
    if route == SMALL_SIDE_ROUTES[0]:
        # ``needs`` is the parameter itself: under o_shared, a view of the
        # ring slot whose contents the wait above made this layer's.
        out = F.linear(x, needs[:, lo:hi], bias)
    elif route == SMALL_SIDE_ROUTES[1]:
        from vllm_ascend_ext.ops.cpu_int8 import plain_int8_linear

        out = plain_int8_linear(layer, needs, x, bias, k_rows=(lo, hi))
    else:
        if needs is not None:
            x = needs.quantize_static(layer, x)
        padded = x.new_zeros(x.shape[0], layer.input_size_per_partition)
        padded[:, lo:hi] = x
        out = _apply_as_plain_tp(layer, padded, bias)
    if series is not None:
        series.prefetch_after(layer, out)

    if not sp:
        return tp.all_reduce(out)
    from vllm_ascend_ext.distributed.communication import reduce_scatter_dim0

    return reduce_scatter_dim0(out, tp)


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
    if not getattr(layer, "adaptive_dp_wide", False):
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
    small = switch_tokens(layer, x.shape[0]) <= layer.adaptive_tokens
    layer.adaptive_calls[small] += 1  # introspection: which side ran how often
    if small:
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
