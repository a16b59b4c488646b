"""What our o_proj takes over from vllm-ascend's ``AscendRowParallelLinear``.

vllm-ascend replaces vLLM's ``RowParallelLinear`` by class name
(``CustomOp.register_oot``), so our subclass is built as itself and misses
what ``AscendLinearBase.__init__`` gives the replacement: for an unquantized
layer, ``AscendUnquantizedLinearMethod`` (``vllm_ascend/ops/linear.py``, line
83 and its use at 135 at v0.25.1rc1 and releases/v0.26.0rc; 83/139 at main).
That method casts the weight to FRACTAL_NZ after loading (``maybe_trans_nz``)
and runs its own GEMM op; vLLM's ``UnquantizedLinearMethod`` on an NPU does
neither. Quantized layers need nothing here: vllm-ascend's quant configs pick
``AscendLinearMethod`` for any ``LinearBase`` (docs/ascend.md, contract 6).

The swap happens only on vllm-ascend's platform (``device_type == "npu"``),
and only for vLLM's exact unquantized method.
"""

from __future__ import annotations

from typing import Any

#: ``NPUPlatform.device_type`` (vllm_ascend/platform.py).
ASCEND_DEVICE_TYPE = "npu"


def on_ascend() -> bool:
    from vllm.platforms import current_platform

    return getattr(current_platform, "device_type", None) == ASCEND_DEVICE_TYPE


def platform_linear_method(method: Any, *, ascend: bool | None = None) -> Any:
    """The linear method our o_proj should run on this platform: vllm-ascend's
    unquantized method in place of vLLM's on Ascend, ``method`` otherwise."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if type(method) is not UnquantizedLinearMethod:
        return method  # quantized: the quant config already chose
    if not (on_ascend() if ascend is None else ascend):
        return method
    from vllm_ascend.ops.linear import AscendUnquantizedLinearMethod

    return AscendUnquantizedLinearMethod()
