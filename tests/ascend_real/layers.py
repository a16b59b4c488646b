"""o_proj layers built from vllm-ascend's real classes, and a modelslim W8A8
"checkpoint" for them (inside a gloo worker).

Sizes: ``A`` o_proj input features, ``H`` hidden size; the FlashComm2 layer's
shard is ``[H, A/k]``, plain TP's ``[H, A/P]``. ``H`` differs from every
``A/n`` so a shape names its dimensions unambiguously (:func:`state_of`).

The checkpoint is what msModelSlim writes for a W8A8 layer, in vllm-ascend's
parameter names (``quantization/methods/w8a8_static.py``): an int8 weight
``[H, A]``, per-tensor ``input_scale`` / ``input_offset``, and per-channel
``weight_scale``, ``weight_offset``, ``deq_scale = input_scale *
weight_scale`` and ``quant_bias = -input_offset * sum_k W[:, k]`` (int32),
which cancels the activation offset once per output sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

A, H = 128, 48
PARAMS_DTYPE = torch.bfloat16  # vllm-ascend's W8A8 creates deq_scale for bf16 / fp16 only
WEIGHT_RANGE = 20
INPUT_OFFSET = 7  # an activation offset: a float zero quantizes to 7


def prefix(layer_idx: int = 0) -> str:
    return f"model.layers.{layer_idx}.self_attn.o_proj"


def modelslim_config(scheme: str | None, num_layers: int = 1) -> Any:
    """vllm-ascend's ``AscendModelSlimConfig`` from a quant description naming
    every o_proj ``scheme`` ("W8A8", "W8A8_DYNAMIC"); None: unquantized."""
    if scheme is None:
        return None
    from vllm_ascend.quantization.modelslim_config import AscendModelSlimConfig

    return AscendModelSlimConfig({f"{prefix(i)}.weight": scheme for i in range(num_layers)})


@dataclass(frozen=True)
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    #: float reference of the whole layer: x [T, A] -> [T, H] (no quantization)
    weight_dequant: torch.Tensor


def checkpoint(scheme: str | None, seed: int, input_scale: float = 0.05) -> Checkpoint:
    g = torch.Generator().manual_seed(seed)
    if scheme is None:
        w = (torch.randn(H, A, generator=g) / A ** 0.5).to(PARAMS_DTYPE)
        return Checkpoint({"weight": w}, w.float())
    w = torch.randint(-WEIGHT_RANGE, WEIGHT_RANGE + 1, (H, A), generator=g, dtype=torch.int8)
    w_scale = (torch.rand(H, 1, generator=g) * 0.01 + 0.005).to(PARAMS_DTYPE)
    tensors = {"weight": w, "weight_scale": w_scale,
               "weight_offset": torch.zeros(H, 1, dtype=PARAMS_DTYPE)}
    if scheme == "W8A8":
        s = torch.tensor([input_scale], dtype=PARAMS_DTYPE)
        tensors.update(
            input_scale=s,
            input_offset=torch.tensor([INPUT_OFFSET], dtype=torch.int8),
            deq_scale=(s.float() * w_scale.float()).flatten(),
            quant_bias=(-INPUT_OFFSET * w.to(torch.int32).sum(dim=1)).to(torch.int32),
        )
    return Checkpoint(tensors, w.float() * w_scale.float())


def load(layer: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Each tensor through its parameter's own weight loader (the layer's
    ``RowParallelLinear.weight_loader`` takes its input-column shard; o_shared
    non-owners ignore it)."""
    for name, t in ckpt.tensors.items():
        p = getattr(layer, name)
        p.weight_loader(p, t)


def plain_tp(scheme: str | None, layer_idx: int = 0, *, full: bool = False,
             num_layers: int = 1) -> torch.nn.Module:
    """vLLM's ``RowParallelLinear``, which vllm-ascend builds as its
    ``AscendRowParallelLinear``; ``full``: one rank's whole matrix
    (``disable_tp``)."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    return RowParallelLinear(A, H, bias=False, params_dtype=PARAMS_DTYPE,
                             quant_config=modelslim_config(scheme, num_layers),
                             prefix=prefix(layer_idx), disable_tp=full)


def flashcomm2(scheme: str | None, layer_idx: int = 0, *, num_layers: int = 1,
               **kwargs: Any) -> torch.nn.Module:
    from vllm_ascend_ext.ops.flashcomm2_oproj import FlashComm2RowParallelLinear

    return FlashComm2RowParallelLinear(A, H, bias=False, params_dtype=PARAMS_DTYPE,
                                       quant_config=modelslim_config(scheme, num_layers),
                                       prefix=prefix(layer_idx), **kwargs)


def post_process(layer: torch.nn.Module) -> None:
    layer.quant_method.process_weights_after_loading(layer)


def reference(full: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole layer on one rank through its real method, additive terms
    included (the scheme asked as TP rank 0; a plain method as vLLM calls it)."""
    method = full.quant_method
    scheme = getattr(method, "quant_method", None)
    if scheme is not None:
        return scheme.apply(full, x, None, 0)
    return method.apply(full, x, None)


def state_of(layer: torch.nn.Module) -> dict[str, tuple[str, str, tuple]]:
    """``name -> (kind, dtype, shape)`` of the layer's own tensors: parameters,
    buffers, and plain tensor attributes (vllm-ascend's post-processing leaves
    some of those). Dimensions read as ``h`` (= H) and ``K`` (this layer's
    input columns), so two partitions of one layer compare equal."""
    k = layer.input_size_per_partition

    def dims(t):
        return tuple("h" if d == H else "K" if d == k else d for d in t.shape)

    out = {}
    for n, t in layer.named_parameters(recurse=False):
        out[n] = ("param", str(t.dtype), dims(t))
    for n, t in layer.named_buffers(recurse=False):
        out[n] = ("buffer", str(t.dtype), dims(t))
    for n, t in vars(layer).items():
        if isinstance(t, torch.Tensor) and not n.startswith("_") and n not in out:
            out[n] = ("attribute", str(t.dtype), dims(t))
    return out


def method_names(layer: torch.nn.Module) -> tuple[str, str | None]:
    m = layer.quant_method
    scheme = getattr(m, "quant_method", None)
    return type(m).__name__, (type(scheme).__name__ if scheme is not None else None)
