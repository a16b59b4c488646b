"""Finalising one member: raw weights onto every rank, its own post-processing, its state.

Every rank runs the layer's original ``process_weights_after_loading`` on the
broadcast raw weights once, so format casts and packing happen exactly as they
would without sharing. What comes out -- the exact tensors the layer's
``quant_method.apply`` consumes (raw weights on CPU/CUDA, NZ-cast weights on
Ascend, a quantized weight plus its scales) -- is what the series stores and
broadcasts from then on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError
from vllm_ascend_ext.ops.shared_weight.members import SeriesMember, layer_name
from vllm_ascend_ext.ops.slot_storage import LayerState, SlotBuffer, round_up

__all__ = ["bind_to_buffer", "broadcast_packed", "materialise"]

_BYTE_DTYPE = torch.uint8


def materialise(member: SeriesMember, *, owned: bool, src: int | None,
                device_group: Any) -> LayerState:
    """The member's processed state on this rank (collective when ``src`` is a rank).

    ``owned``: this rank loaded the raw weights; ``src``: the owner's global
    rank, or None in a group of one (nothing to broadcast).
    """
    layer = member.layer
    params = []
    for r in member.raw:
        param = layer._parameters.get(r.name)
        if param is None:
            raise SharedWeightError(
                f"layer {layer_name(layer)!r} lost parameter {r.name!r} "
                "between registration and finalisation"
            )
        if not owned:
            param.data = torch.empty(r.shape, dtype=r.dtype, device=r.device)
        # (no owner-only shape check here: raising on one rank would leave
        # the others blocked in the broadcast below)
        params.append(param.data)
    if src is not None:
        broadcast_packed(params, src=src, group=device_group, is_src=owned)
    del params
    member.post_method(layer)

    weight = getattr(layer, "weight", None)
    if any(r.name == "weight" for r in member.raw) and (
        not isinstance(weight, torch.Tensor) or weight.numel() == 0
    ):
        raise SharedWeightError(
            f"layer {layer_name(layer)!r}: {type(layer.quant_method).__name__}."
            "process_weights_after_loading left layer.weight empty or not a "
            "tensor (an opaque packed representation); it cannot be broadcast, "
            "so this quant method cannot be used in a shared-weight series"
        )
    state = [
        (n, "param", t)
        for n, t in layer.named_parameters(recurse=False)
        if isinstance(t, torch.Tensor) and t.numel() > 0
    ]
    state += [
        (n, "buffer", t)
        for n, t in layer.named_buffers(recurse=False)
        if isinstance(t, torch.Tensor) and t.numel() > 0
    ]
    if not state:
        raise SharedWeightError(
            f"layer {layer_name(layer)!r} has no tensor state after post-processing"
        )
    return state


def bind_to_buffer(layer: nn.Module, buffer: SlotBuffer, state: LayerState) -> None:
    """Point the layer's parameters and buffers at ``buffer``'s views, for good:
    parameter objects keep their identity (torch.compile sees stable tensors),
    later broadcasts only change contents."""
    for view, (name, kind, _) in zip(buffer.views, state):
        table = layer._parameters if kind == "param" else layer._buffers
        table[name].data = view


def broadcast_packed(
    tensors: list[torch.Tensor], src: int, group: Any, is_src: bool
) -> None:
    """Broadcast several tensors as one byte buffer (any dtype, one collective)."""
    if not tensors:
        return
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for nb in sizes:
        offsets.append(total)
        total += round_up(max(nb, 1))
    buf = torch.empty(total, dtype=_BYTE_DTYPE, device=tensors[0].device)
    if is_src:
        for t, off, nb in zip(tensors, offsets, sizes):
            buf[off : off + nb].copy_(t.detach().contiguous().reshape(-1).view(_BYTE_DTYPE))
    dist.broadcast(buf, src=src, group=group)
    if not is_src:
        for t, off, nb in zip(tensors, offsets, sizes):
            t.copy_(buf[off : off + nb].view(t.dtype).view(t.shape))
