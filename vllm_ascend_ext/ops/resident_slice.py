"""Adaptive FlashComm2's small steps from a resident row-parallel slice.

Adaptive FlashComm2 runs a forward pass of at most ``adaptive_tokens``
tokens as plain TP (``ops/adaptive_oproj.py``), which needs only this rank's
``a/P`` input columns of the o_proj. FlashComm2's own weight is the wrong
place to read them: under o_shared it lives in a ring slot that another rank
fills; without o_shared it is the whole ``a/k``-column shard, whose column
range is a strided view at best (vLLM CPU's oneDNN handle and torch_npu's NZ
format have no columns to take at all).

Here each rank keeps exactly what plain TP keeps: the o_proj that vLLM (or
vllm-ascend, on Ascend: ``AscendRowParallelLinear`` with its own quant method)
built for this layer, which FlashComm2's install would otherwise throw away.
It stays a child of the FlashComm2 layer (``layer.resident_slice``), is fed by
the same checkpoint tensor as the FlashComm2 layer (its own ``weight_loader``
cuts this rank's columns), is post-processed by vLLM's ordinary pass with its
own quant method (so on every platform it holds the format its own kernel
wants: oneDNN-packed on CPU, NZ on Ascend), and runs its own forward, all-reduce
included. A small pass therefore equals plain TP by construction, and never
touches the series: the ring's state at the start of any pass is "slots hold
positions ``0..k-1``" (filled by the previous large pass, or at finalisation),
which a pass that skips the ring leaves as it found it.

Cost: ``L * W / P`` bytes per rank (plain TP's whole o_proj). With
o_shared's TP-shard storage these are the shards themselves (nothing more);
on top of round-robin's owned layers, or of FlashComm2's replicated weight
without o_shared, they are extra.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vllm_ascend_ext.ops.flashcomm2_plan import padded_token_count

__all__ = [
    "RESIDENT_SLICE_ATTR",
    "attach_resident_slice",
    "resident_slice_bytes",
    "resident_slice_of",
    "resident_slice_param_names",
    "run_resident_slice",
]

RESIDENT_SLICE_ATTR = "resident_slice"


def resident_slice_of(layer: nn.Module) -> nn.Module | None:
    return layer._modules.get(RESIDENT_SLICE_ATTR)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def attach_resident_slice(layer: nn.Module, row_parallel: nn.Module) -> None:
    """Keep ``row_parallel`` (vLLM's o_proj for the same layer, not yet
    loaded) as ``layer``'s small-step weights.

    Call after ``layer`` joined its series (which may have swapped the
    loaders of parameters this rank does not own): every loader of ``layer``
    is wrapped to feed the same checkpoint tensor to the slice first."""
    slice_params = dict(row_parallel.named_parameters(recurse=False))
    for name, param in layer.named_parameters(recurse=False):
        target = slice_params.get(name)
        if target is None:
            raise ValueError(
                f"{getattr(layer, 'prefix', '')!r}: vLLM's o_proj has no parameter {name!r} "
                f"to keep a resident slice of (it has {sorted(slice_params)})")
        param.weight_loader = _feeding(target, param.weight_loader)
    # The bytes as loaded: on vLLM CPU the post-load pass moves the weight
    # into a oneDNN handle that no tensor shows.
    row_parallel.resident_slice_bytes = sum(_tensor_bytes(p) for p in slice_params.values())
    layer.add_module(RESIDENT_SLICE_ATTR, row_parallel)


def _feeding(target: torch.nn.Parameter, inner: Any):
    slice_loader = target.weight_loader

    def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor,
                      *args: Any, **kwargs: Any) -> Any:
        slice_loader(target, loaded_weight, *args, **kwargs)
        return inner(param, loaded_weight, *args, **kwargs)

    return weight_loader


def resident_slice_param_names(model: nn.Module) -> set[str]:
    """Qualified names of every resident slice's parameters (vLLM's loader
    checks that each parameter was loaded; these are, through their layer's
    checkpoint tensor)."""
    prefix = f".{RESIDENT_SLICE_ATTR}."
    return {name for name, _ in model.named_parameters() if prefix in name}


def resident_slice_bytes(layer: nn.Module) -> int:
    s = resident_slice_of(layer)
    return 0 if s is None else int(s.resident_slice_bytes)


def run_resident_slice(layer: nn.Module, x: torch.Tensor, sp: bool) -> torch.Tensor:
    """``x`` ``[T, a/P]`` through vLLM's own row-parallel o_proj: ``[T, h]``
    summed over TP (or this rank's padded token block with ``sp``)."""
    rp = layer._modules.get(RESIDENT_SLICE_ATTR)
    if rp is None:
        raise RuntimeError(
            f"{getattr(layer, 'prefix', '')!r}: adaptive FlashComm2 runs small passes through "
            "plain TP's o_proj, but none was attached to this layer (attach_resident_slice "
            "before loading; the model install does)")
    tp = layer.flashcomm2_tp_group
    if sp:
        num_tokens = x.shape[0]
        x = torch.nn.functional.pad(
            x, (0, 0, 0, padded_token_count(num_tokens, tp.world_size) - num_tokens))
    out = rp.forward(x)  # not rp(x): the slice has no hooks, and __call__ costs host time
    if isinstance(out, tuple):
        out = out[0]
    if not sp:
        return out
    block = out.shape[0] // tp.world_size
    return out[tp.rank_in_group * block:(tp.rank_in_group + 1) * block]
