"""The two custom ops that place a series' wait and prefetch in a forward pass.

``vllm_ascend_ext::shared_weight_wait(anchor, series_name, position)`` runs
before a member's matmul (anchor = the layer input),
``vllm_ascend_ext::shared_weight_prefetch(anchor, series_name, position)``
after it (anchor = the layer output). Both declare their anchor mutated, which
keeps them in order under torch.compile; they find the series by name in
:data:`~vllm_ascend_ext.ops.shared_weight.registry.shared_weight_registry`.
"""

from __future__ import annotations

import torch

from vllm_ascend_ext.custom_ops import register_custom_op
from vllm_ascend_ext.ops.shared_weight.registry import shared_weight_registry


def _shared_weight_wait(anchor: torch.Tensor, series_name: str, position: int) -> None:
    shared_weight_registry.get(series_name).ring_for(position).wait(position)


def _shared_weight_prefetch(
    anchor: torch.Tensor, series_name: str, position: int
) -> None:
    shared_weight_registry.get(series_name).ring_for(position).prefetch_after(position)


def _shared_weight_hook_fake(
    anchor: torch.Tensor, series_name: str, position: int
) -> None:
    return None


for _name, _impl in (
    ("shared_weight_wait", _shared_weight_wait),
    ("shared_weight_prefetch", _shared_weight_prefetch),
):
    register_custom_op(_name, _impl, _shared_weight_hook_fake, mutates_args=["anchor"])
