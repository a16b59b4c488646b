"""Joining a series: what registration records about a layer and changes on it.

Registration happens before the layer's weights load. It records the raw
parameters' shapes (every member must match the first), routes the layer's
``process_weights_after_loading`` to the series' finalisation, keeps the
processed weight a plain tensor on vLLM CPU, drops the storage of layers this
rank does not own (their ``weight_loader`` then ignores the checkpoint) and,
for plain linear layers, wraps ``forward`` with the wait / prefetch hooks.

Why the processed weight must stay a plain tensor: a quant method whose
processed state is opaque cannot be broadcast. vLLM CPU's unquantized method
packs the weight into a oneDNN handle and leaves ``layer.weight`` empty, so
registration sets vLLM's own escape hatch ``layer._cpu_skip_gemm_dispatch =
True`` on CPU (the weight stays a tensor and the layer uses ``F.linear``), and
vLLM CPU's int8 W8A8 kernel without AMX keeps a plain int8 weight
(``ops/cpu_int8.py``). Any other method that leaves an empty weight is
rejected at finalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError

__all__ = [
    "RawParam",
    "SeriesMember",
    "drop_unowned_storage",
    "install_forward_wrapper",
    "layer_name",
    "new_member",
    "read_layer_index",
]


@dataclass
class RawParam:
    """A parameter as the checkpoint loads it (before post-processing)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass
class SeriesMember:
    layer: nn.Module
    layer_idx: int
    post_method: Callable[[nn.Module], None]  # the layer's own post-load step
    raw: list[RawParam]
    position: int = -1  # set at finalisation


def layer_name(layer: nn.Module) -> str:
    return getattr(layer, "prefix", "") or type(layer).__name__


def _skip_loading(*args: Any, **kwargs: Any) -> None:
    """Weight loader of a parameter this rank does not own: load nothing."""
    return None


def read_layer_index(layer: nn.Module) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    prefix = getattr(layer, "prefix", None)
    if not prefix:
        raise SharedWeightError(
            f"layer {type(layer).__name__} has no prefix; pass layer_idx explicitly"
        )
    try:
        return extract_layer_index(prefix)
    except (AssertionError, ValueError) as e:
        raise SharedWeightError(
            f"cannot read a layer index from prefix {prefix!r}: {e}"
        ) from None


def new_member(
    series_name: str, layer: nn.Module, layer_idx: int, first: SeriesMember | None
) -> SeriesMember:
    """Check ``layer`` against the series' first member and hook its post-load step."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    name = layer_name(layer)
    quant_method = getattr(layer, "quant_method", None)
    if not isinstance(quant_method, QuantizeMethodBase):
        raise SharedWeightError(
            f"layer {name!r} has no vLLM quant_method; only vLLM linear "
            "layers can join a shared-weight series"
        )
    raw = [
        RawParam(pname, tuple(p.shape), p.dtype, p.device)
        for pname, p in layer.named_parameters(recurse=False)
        if p.numel() > 0
    ]
    if not raw:
        raise SharedWeightError(f"layer {name!r} has no parameters to share")
    if first is not None:
        sig = [(r.name, r.shape, r.dtype) for r in raw]
        ref_sig = [(r.name, r.shape, r.dtype) for r in first.raw]
        if sig != ref_sig:
            raise SharedWeightError(
                f"layer {name!r} does not match series {series_name!r}: all "
                "members must have identical parameters (name, shape, dtype); "
                f"got {sig}, series has {ref_sig} (from {layer_name(first.layer)!r})"
            )
    post_method = _route_post_load_to_series(quant_method)
    post_method = _keep_processed_weight_plain(layer, post_method, name)
    return SeriesMember(layer, layer_idx, post_method, raw)


def _route_post_load_to_series(quant_method: Any) -> Callable:
    """A member's post-load call finalises its series; returns the original."""
    current = quant_method.process_weights_after_loading
    original = getattr(current, "_shared_weight_original", current)
    if original is current:  # not hooked yet (quant methods may be shared)

        def process_weights_after_loading(module: nn.Module) -> None:
            series = getattr(module, "shared_weight_series", None)
            if series is None:
                original(module)
            else:
                series.finalize()

        process_weights_after_loading._shared_weight_original = original
        quant_method.process_weights_after_loading = process_weights_after_loading
    return original


def _keep_processed_weight_plain(layer: nn.Module, post_method: Callable,
                                 name: str) -> Callable:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return post_method
    from vllm_ascend_ext.compat import keep_cpu_linear_weight_plain
    from vllm_ascend_ext.ops.cpu_int8 import keep_int8_weight_plain

    post_method = keep_cpu_linear_weight_plain(layer, post_method)
    # W8A8 int8 without AMX: a plain int8 weight instead of a oneDNN handle.
    return keep_int8_weight_plain(layer, post_method, name)


def drop_unowned_storage(member: SeriesMember) -> None:
    """Not ours: drop the storage before loading and ignore the checkpoint."""
    for r in member.raw:
        param = member.layer._parameters[r.name]
        param.data = torch.empty(0, dtype=r.dtype, device=r.device)
        param.weight_loader = _skip_loading


def install_forward_wrapper(series: Any, member: SeriesMember) -> None:
    """wait(input) -> the layer's forward -> prefetch(output), per instance."""
    layer = member.layer
    inner = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        anchor = args[0] if args else next(iter(kwargs.values()))
        series.wait(member.position, anchor)
        out = inner(*args, **kwargs)
        if isinstance(out, tuple):
            if not series.owns_position(member.position):
                # Extra outputs (vLLM returns the bias with skip_bias_add)
                # are views of the ring slot the prefetch is about to
                # overwrite: hand the caller its own copy.
                out = (out[0],) + tuple(
                    o.clone() if isinstance(o, torch.Tensor) else o for o in out[1:]
                )
            series.prefetch_after(member.position, out[0])
        else:
            series.prefetch_after(member.position, out)
        return out

    layer.forward = forward
