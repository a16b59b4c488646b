"""Upstream vllm-ascend's module-level function names, for migrating callers."""

from __future__ import annotations

from typing import Any

from torch import nn

from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError
from vllm_ascend_ext.ops.shared_weight.members import layer_name
from vllm_ascend_ext.ops.shared_weight.registry import shared_weight_registry
from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

__all__ = [
    "is_hidden_layer",
    "post_process_after_loading_for_shared_weight_series",
    "reach_layer_for_shared_weight_series",
    "register_layer_to_shared_weight_series",
]


def register_layer_to_shared_weight_series(
    series_name: str, group: Any, layer: nn.Module, prefetch_step: int = 1
) -> SharedWeightSeries:
    """Add ``layer`` to the series ``series_name``, creating it on first use."""
    series = shared_weight_registry.find(series_name)
    if series is None:
        series = SharedWeightSeries(series_name, group, prefetch_step)
    elif series.group is not group or series.prefetch_step != prefetch_step:
        raise SharedWeightError(
            f"layer {layer_name(layer)!r}: series {series_name!r} exists with a "
            f"different group or prefetch_step ({series.prefetch_step} vs {prefetch_step})"
        )
    series.add_layer(layer)
    return series


def _series_of(layer: nn.Module) -> SharedWeightSeries:
    series = getattr(layer, "shared_weight_series", None)
    if series is None:
        raise SharedWeightError(
            f"layer {layer_name(layer)!r} is not registered in a shared-weight series"
        )
    return series


def post_process_after_loading_for_shared_weight_series(layer: nn.Module) -> None:
    """Finalise ``layer``'s series (idempotent; vLLM's post-load pass does it too)."""
    _series_of(layer).finalize()


def reach_layer_for_shared_weight_series(layer: nn.Module) -> None:
    """No-op kept for migrating callers.

    Prefetches are issued automatically right after each member's matmul
    (the ``shared_weight_prefetch`` op), which is the earliest point the slot
    is free; an extra call here would have nothing left to do.
    """
    _series_of(layer)


def is_hidden_layer(vllm_config: Any, layer: nn.Module) -> bool:
    """True for decoder layers proper (MTP layers have index >= num_hidden_layers)."""
    from vllm.model_executor.models.utils import extract_layer_index

    # Multimodal configs (Llava, Qwen2-VL) keep the decoder depth only in
    # their text config; hf_text_config is that part (or the config itself).
    num_hidden_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
    return extract_layer_index(layer.prefix) < num_hidden_layers
