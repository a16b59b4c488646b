"""FlashComm2's all-to-all in int8, for o_projs whose matmul quantizes its input anyway.

A W8A8 o_proj quantizes its activations to int8 right before the matmul.
Under FlashComm2 that is right after the all-to-all, so the all-to-all can
carry the int8 values instead: half the bytes of bf16, the same matmul input.

Rounding is elementwise once the scale is fixed, so quantizing each rank's
slice before the exchange gives the very int8 values the matmul would have
made after it, provided the scale is the same:

- static per-tensor scale (``input_scale`` in the checkpoint): it is the same
  on every rank by construction; each rank quantizes with the layer's own
  quantizer;
- dynamic per-token scale: the matmul would take a token's absolute maximum
  over the ``a/k`` columns it receives, which are spread over the ``D``
  ranks of its ODP group; an all-reduce(MAX) of a ``[T_pad]`` fp32 vector over
  that group gives every rank that maximum first. The scales then need not
  travel: every rank holds all of them and picks the rows it received.

Where this runs (:func:`int8_input_of`), with the matmul that takes the
int8 input:

===================  ============================================  ===================================
route                o_proj                                        matmul on int8 input
===================  ============================================  ===================================
``cpu-onednn``       vLLM CPU int8 kernel, oneDNN path (no AMX)    ``onednn_scaled_mm`` on the handle
``cpu-plain``        o_shared member on that path (``cpu_int8``)   ``torch._int_mm``
``ascend-static``    vllm-ascend ``AscendW8A8LinearMethod``        the scheme's ``apply`` (it skips its
                                                                   quantization for int8 input)
===================  ============================================  ===================================

Everywhere else the all-to-all stays in the activation dtype: unquantized
o_projs, asymmetric activations, vLLM CPU's AMX path (its kernel quantizes
inside the matmul and takes no int8 input), vllm-ascend's dynamic W8A8
(``npu_dynamic_quant`` inside ``apply``, no int8 entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from vllm_ascend_ext.ops.cpu_int8 import int8_kernel_of

__all__ = [
    "ASCEND_W8A8_STATIC_SCHEME",
    "Int8Input",
    "int8_input_of",
    "per_token_absmax",
    "quantize_per_token",
]

#: vllm-ascend's W8A8 static-activation scheme (quantization/methods/w8a8_static.py).
ASCEND_W8A8_STATIC_SCHEME = "AscendW8A8LinearMethod"

#: ``matmul(layer, x_q [M, K] int8, x_s ([M, 1] fp32 or None), bias, out_dtype)``
Int8Matmul = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None",
                       "torch.Tensor | None", torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Int8Input:
    """How one o_proj takes activations quantized before the all-to-all."""

    route: str
    #: per-token dynamic scales (else one static per-tensor scale)
    per_token: bool
    #: static scheme only: ``[T, c]`` activations -> int8 with the layer's scale
    quantize_static: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None
    matmul: Int8Matmul


def per_token_absmax(x: torch.Tensor) -> torch.Tensor:
    """``[T]`` fp32: each row's largest magnitude (exact: one of the row's values)."""
    return x.abs().amax(dim=-1).to(torch.float32)


def quantize_per_token(x: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with the scale ``absmax / 127`` per row: ``(x_q, scale [T, 1])``.

    The arithmetic of vLLM CPU's ``dynamic_scaled_int8_quant`` (read in vLLM
    0.32.0): fp32 scale, its reciprocal computed in double and rounded to
    fp32, ``x * reciprocal`` in fp32, clamp to [-128, 127], round half to
    even. So a row quantized here with the row's own absmax is bit-identical
    to that kernel's output (``tests/test_int8_all_to_all.py``). A zero row
    (FlashComm2's padding) becomes zeros with scale 0.
    """
    scale = (absmax / 127.0).reshape(-1, 1)
    inv = torch.where(scale > 0, 1.0 / scale.double(), torch.zeros_like(scale, dtype=torch.float64))
    q = (x.to(torch.float32) * inv.to(torch.float32)).clamp(-128.0, 127.0).round()
    return q.to(torch.int8), scale


# --------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------


def _cpu_static_quantizer(kernel: Any) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    i_s_name = kernel.layer_param_names[2]

    def quantize(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from vllm import _custom_ops as ops

        return ops.onednn_scaled_int8_quant(x, getattr(layer, i_s_name), None, True)[0]

    return quantize


def _cpu_onednn_matmul(kernel: Any) -> Int8Matmul:
    i_s_name = kernel.layer_param_names[2]

    def matmul(layer, x_q, x_s, bias, out_dtype):
        from vllm import _custom_ops as ops

        if x_s is None:
            x_s = getattr(layer, i_s_name)
        out = torch.empty((x_q.shape[0], kernel.dnnl_handler.n), dtype=out_dtype)
        ops.onednn_scaled_mm(kernel.dnnl_handler, x_q, out, x_s, None, None, bias)
        return out

    return matmul


def _cpu_plain_matmul(apply: Any, kernel: Any) -> Int8Matmul:
    i_s_name = kernel.layer_param_names[2]

    def matmul(layer, x_q, x_s, bias, out_dtype):
        if x_s is None:
            x_s = getattr(layer, i_s_name)
        return apply.int8_input_matmul(layer, x_q, x_s, bias, out_dtype)

    return matmul


def _cpu_route(layer: nn.Module) -> Int8Input | None:
    kernel = int8_kernel_of(layer)
    if kernel is None or not kernel.config.input_symmetric:
        return None
    per_token = not kernel.config.is_static_input_scheme
    static_q = None if per_token else _cpu_static_quantizer(kernel)
    method = kernel.linear_method
    if getattr(method, "int8_input_matmul", None) is not None:
        return Int8Input("cpu-plain", per_token, static_q, _cpu_plain_matmul(method, kernel))
    if getattr(method, "__name__", "") == "_apply_weights_onednn":
        return Int8Input("cpu-onednn", per_token, static_q, _cpu_onednn_matmul(kernel))
    return None  # AMX path: int8_scaled_mm_with_quant quantizes inside


def _ascend_route(layer: nn.Module) -> Int8Input | None:
    from vllm_ascend_ext.ops.quant_terms import apply_linear, takes_rank

    method = getattr(layer, "quant_method", None)
    if not takes_rank(method) or type(method.quant_method).__name__ != ASCEND_W8A8_STATIC_SCHEME:
        return None

    def quantize(lyr: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # vllm-ascend's own quantizer op; its per-channel vectors repeat one
        # per-tensor value over the o_proj's input columns, so the first
        # ``c`` of them serve this rank's ``c`` columns.
        c = x.shape[-1]
        return torch.ops.vllm.quantize(
            x, lyr.aclnn_input_scale[:c], lyr.aclnn_input_scale_reciprocal[:c],
            lyr.aclnn_input_offset[:c])

    def matmul(lyr, x_q, x_s, bias, out_dtype):
        return apply_linear(lyr, x_q, bias)  # the scheme skips quantizing int8 input

    return Int8Input("ascend-static", False, quantize, matmul)


def int8_input_of(layer: nn.Module) -> Int8Input | None:
    """The int8 route of ``layer``'s processed quant method, or None.

    Chosen by what the method is, not by the weight's device: vllm-ascend's
    wrapper gets the Ascend route (or none), anything else the CPU kernel's.
    (vllm-ascend's classes only run on NPUs in production; tests/ascend_real
    runs the real ones on CPU tensors, through this same selection.)
    Read from the live kernel objects after ``process_weights_after_loading``;
    under torch.compile it is evaluated once, while tracing.
    """
    from vllm_ascend_ext.ops.quant_terms import takes_rank

    if takes_rank(getattr(layer, "quant_method", None)):
        return _ascend_route(layer)
    return _cpu_route(layer)
