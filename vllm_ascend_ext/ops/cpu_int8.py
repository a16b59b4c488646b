"""W8A8 int8 o_proj weights that a shared-weight series can broadcast, on vLLM CPU.

vLLM CPU's int8 kernel (``CPUInt8ScaledMMLinearKernel``,
``vllm/model_executor/kernels/linear/scaled_mm/cpu.py``, read in vLLM 0.32.0)
post-processes a weight one of two ways, by CPU kind:

- with AMX (and K % 32 == 0, N % 16 == 0): VNNI-packed into a plain int8
  tensor (``process_weights_for_sgl``), which a series broadcasts as is;
- without AMX: moved into a oneDNN handle held by the kernel, with the
  layer's weight attribute set to None (``process_weights_for_onednn``).
  That handle is opaque, and each rank would build one for every layer from
  the broadcast raw weights, so o_shared could neither share it nor save any
  memory.

For a series member on the second path, :func:`keep_int8_weight_plain`
replaces that post-load step with one that keeps what the oneDNN route keeps
*except* the handle: the int8 weight transposed to ``[K, N]`` (a plain
tensor, broadcast like any other), the per-channel weight scale and, for a
static scheme, the per-tensor input scale. The matmul is then
``torch._int_mm`` (int8 x int8 -> int32, exact) on activations quantized by
vLLM's own per-token op (``onednn_scaled_int8_quant``), scaled by
``x_scale * w_scale`` in fp32, as the oneDNN kernel does. Asymmetric
activations (azp) are not covered and stop start-up with an error naming the
layer and the scheme.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

#: vLLM CPU's int8 scaled-mm kernel class (vLLM 0.32).
CPU_INT8_KERNEL = "CPUInt8ScaledMMLinearKernel"


def int8_kernel_of(layer: nn.Module) -> Any | None:
    """The CPU int8 kernel behind ``layer``'s quant method, if it has one."""
    scheme = getattr(layer, "scheme", None)
    kernel = getattr(scheme, "kernel", None)
    if kernel is None:
        kernel = getattr(getattr(layer, "quant_method", None), "kernel", None)
    return kernel if type(kernel).__name__ == CPU_INT8_KERNEL else None


def takes_onednn_route(layer: nn.Module, kernel: Any) -> bool:
    """True where the kernel would hide the weight in a oneDNN handle (the
    kernel's own test: the AMX path needs x86, symmetric input and
    ``check_cpu_sgl_kernel``)."""
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    from vllm.platforms import current_platform
    from vllm.platforms.interface import CpuArchEnum

    weight = getattr(layer, kernel.layer_param_names[0])
    n, k = weight.shape
    return not (current_platform.get_cpu_architecture() == CpuArchEnum.X86
                and kernel.config.input_symmetric
                and check_cpu_sgl_kernel(n, k, weight.dtype))


def keep_int8_weight_plain(layer: nn.Module, post_load: Callable,
                           layer_name: str) -> Callable:
    """The post-load step for a series member: ``post_load`` unless the layer
    runs vLLM CPU's int8 kernel on its oneDNN route; then the plain-weight
    processing above, and the kernel's matmul switched to ``torch._int_mm``."""
    kernel = int8_kernel_of(layer)
    if kernel is None or not takes_onednn_route(layer, kernel):
        return post_load  # AMX route: a plain VNNI-packed tensor already
    if not kernel.config.input_symmetric:
        from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError

        raise SharedWeightError(
            f"layer {layer_name!r}: {type(getattr(layer, 'scheme', kernel)).__name__} with "
            "asymmetric int8 activations keeps its weight in a oneDNN handle on a CPU "
            "without AMX, which cannot be broadcast; o_shared supports symmetric "
            "activations there")

    def process(lyr: nn.Module) -> None:
        _process_plain(lyr, kernel)

    return process


def _process_plain(layer: nn.Module, kernel: Any) -> None:
    from vllm.model_executor.layers.quantization.utils import replace_parameter
    from vllm.model_executor.layers.quantization.utils.w8a8_utils import (
        convert_to_channelwise,
    )

    w_q_name, w_s_name, i_s_name, _, _ = kernel.layer_param_names
    weight = getattr(layer, w_q_name)
    # [K, N], a transposed view: the layout torch._int_mm takes as its right side.
    replace_parameter(layer, w_q_name, nn.Parameter(weight.t(), requires_grad=False))
    scale = getattr(layer, w_s_name)
    if not kernel.config.is_channelwise:
        scale = convert_to_channelwise(scale, layer.logical_widths)
    replace_parameter(layer, w_s_name,
                      nn.Parameter(scale.reshape(-1).to(torch.float32), requires_grad=False))
    if kernel.config.is_static_input_scheme:
        replace_parameter(layer, i_s_name,
                          nn.Parameter(getattr(layer, i_s_name).max(), requires_grad=False))

    def apply(lyr: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        return plain_int8_linear(lyr, kernel, x, bias)

    # FlashComm2's int8 all-to-all hands this route activations it quantized itself.
    apply.int8_input_matmul = lambda lyr, x_q, x_s, bias, out_dtype: plain_int8_matmul(
        lyr, kernel, x_q, x_s, bias, out_dtype)
    kernel.linear_method = apply


def plain_int8_linear(layer: nn.Module, kernel: Any, x: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """vLLM's per-token (or static) int8 quantization of ``x``, then
    :func:`plain_int8_matmul`."""
    from vllm import _custom_ops as ops

    i_s = getattr(layer, kernel.layer_param_names[2], None)
    shape = x.shape
    x_q, x_s, _ = ops.onednn_scaled_int8_quant(
        x.reshape(-1, shape[-1]).contiguous(), i_s, None, True)
    out = plain_int8_matmul(layer, kernel, x_q, x_s, bias, x.dtype)
    return out.reshape(*shape[:-1], out.shape[-1])


def plain_int8_matmul(layer: nn.Module, kernel: Any, x_q: torch.Tensor, x_s: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``[M, K]`` int8 activations with their scale (per token ``[M, 1]`` or one
    per tensor) times the plain ``[K, N]`` int8 weight, in ``out_dtype``."""
    w_q_name, w_s_name, _, _, _ = kernel.layer_param_names
    w_q, w_s = getattr(layer, w_q_name), getattr(layer, w_s_name)
    acc = torch._int_mm(x_q, w_q)
    out = acc.to(torch.float32) * x_s.reshape(-1, 1).to(torch.float32) * w_s
    out = out.to(out_dtype)
    if bias is not None:
        out = out + bias
    return out
