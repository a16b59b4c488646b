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

from vllm_ascend_ext.ops.shared_weight.registry import shared_weight_registry

_OP_NAMESPACE = "vllm_ascend_ext"
_lib = torch.library.Library(_OP_NAMESPACE, "FRAGMENT")  # noqa: TID251


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


def _register_ops() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    ns = getattr(torch.ops, _OP_NAMESPACE)
    for name, impl in (
        ("shared_weight_wait", _shared_weight_wait),
        ("shared_weight_prefetch", _shared_weight_prefetch),
    ):
        if hasattr(ns, name):  # module re-imported: keep the first definition
            continue
        direct_register_custom_op(
            op_name=name,
            op_func=impl,
            mutates_args=["anchor"],
            fake_impl=_shared_weight_hook_fake,
            target_lib=_lib,
        )


_register_ops()
