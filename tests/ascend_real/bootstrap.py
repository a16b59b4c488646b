"""Run vllm-ascend main's own Python code on vLLM CPU 0.27.1: the bootstrap.

Importing this package (``tests/ascend_real``) calls :func:`install` once per
process, so the pytest process and every gloo worker it spawns see the same
world: vllm-ascend's ``NPUPlatform`` as vLLM's current platform, and the
vendored ``vllm_ascend`` package importable. Everything below is this
project's code; nothing is copied from vllm-ascend, and the vendored folder is
only put on ``sys.path``.

The stand-ins, and what each assumes (the one place that says so):

=============================  ==================================================================
stand-in                       assumes
=============================  ==================================================================
``torch_npu`` module           vllm-ascend only *reads* ``torch_npu`` at import (``_C``, the dtype
                               constants, kernel names) and, in the code paths these tests run,
                               calls only the kernels listed below. Every other attribute is a
                               :class:`NeedsNpu` placeholder: calling it raises, naming it, so a
                               test cannot pass through an NPU kernel that was not replaced.
                               The dtype constants are the values vllm-ascend's own CPU unit-test
                               job sets (``tests/ut/conftest.py``): ``float4_e2m1fn_x2`` 296,
                               ``hifloat8`` 290, ``float8_e8m0fnu`` 293.
``npu_format_cast``            the identity: on CPU there is no FRACTAL_NZ storage. NZ padding
                               and ``get_npu_format`` are therefore *not* exercised here
                               (tests/test_slot_storage.py keeps its own stand-in for that).
``npu_quantize``               ``round(x * scale_reciprocal + offset)`` saturated to int8, per
                               channel (the documented semantics of the kernel with
                               ``div_mode=False``, which is how vllm-ascend's ``quantize`` op
                               calls it).
``npu_dynamic_quant``          symmetric per-token int8: scale = ``absmax(row) / 127``,
                               ``round(x / scale)``; returns ``(int8, fp32 scale [T])``.
``npu_quant_matmul``           ``int32(x) @ int32(w)`` (w is ``[K, N]``, as vllm-ascend's
                               post-processing leaves it), ``+ bias`` in int32 (W8A8-static's
                               ``quant_bias``) or in float (a float bias), ``* scale`` (fp32, or
                               int64 holding fp32 bits as ``deq_scale`` does for fp16),
                               ``* pertoken_scale`` per row; cast to ``output_dtype``.
``ProcessGroupHCCL.Options``   an attribute holder: vllm-ascend's patched ``GroupCoordinator``
                               hands HCCL buffer options to ``new_group`` for every group it
                               builds (ours included); gloo ignores ``pg_options``.
``torch.npu``                  vllm-ascend reads ``torch.npu.NPUGraph`` etc. at import; all of
                               it is :class:`NeedsNpu` except ``is_available() -> False`` and
                               ``current_device() -> 0`` (one device per process, index 0).
PrivateUse1 named ``npu``      vLLM builds ``torch.device("npu:N")`` for its groups under
                               ``NPUPlatform``; torch's Python hook interface for such a backend
                               answers "built, not available", so torch.distributed's barrier
                               picks the CPU for gloo groups. No tensor is ever placed on it.
``vllm_ascend._build_info``    ``__device_type__ = "A2"`` (setup.py writes this module on a
                               build; A2 = Atlas 800I/T A2, vllm-ascend's default target).
platform entry point           a ``vllm-ascend`` dist-info (``site/``) with vllm-ascend's own
                               ``[vllm.platform_plugins] ascend = vllm_ascend:register`` line;
                               ``VLLM_PLUGINS=ascend,vllm_ascend_ext`` loads only that and this
                               project's plugin (vllm-ascend's general plugins are KV connectors,
                               loaders and profiling, none of which these tests reach).
``torchvision``                a placeholder package with a dist-info version (``site/``):
                               vllm-ascend's patches import transformers' Qwen2-VL image
                               processor, which imports torchvision; no test runs vision code.
``vllm::*`` CPU kernels        vllm-ascend (and, under ``NPUPlatform``, vLLM's
                               ``direct_register_custom_op`` for this project's ops) registers
                               custom ops for ``PrivateUse1`` only. The same Python function is
                               also registered for ``CPU``, so the op runs unchanged on CPU
                               tensors; nothing about the op itself is replaced.
=============================  ==================================================================

``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` keeps torch from looking for a real
``torch_npu`` backend entry point.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import typing
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
#: vllm-ascend main@182b75ea, beside the checkout (../shared/vendor); CI clones
#: the checkout next to the same shared/ folder.
VENDORED_DIR_NAME = "vllm-ascend-182b75ea"
VENDORED = ROOT.parent / "shared" / "vendor" / VENDORED_DIR_NAME
SITE = Path(__file__).resolve().parent / "site"
PLUGINS = "ascend,vllm_ascend_ext"

_installed = False


class NeedsNpu:
    """A ``torch_npu`` / ``torch.npu`` attribute with no CPU version here.

    Attribute access returns further placeholders (import-time reads work);
    a call raises, naming the attribute."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> "NeedsNpu":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return NeedsNpu(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(
            f"{self._name} needs an NPU: tests/ascend_real/bootstrap.py has no CPU version of it")

    def __repr__(self) -> str:
        return f"<NeedsNpu {self._name}>"

    # read in annotations at import (``torch.npu.Event | None``)
    def __or__(self, other):
        return typing.Any

    __ror__ = __or__


class _NpuModule(types.ModuleType):
    """A module whose unknown attributes are :class:`NeedsNpu`."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return NeedsNpu(f"{self.__name__}.{attr}")


# --------------------------------------------------------------------------
# CPU references for the NPU kernels the tested paths call
# --------------------------------------------------------------------------


def npu_format_cast(tensor: torch.Tensor, acl_format: int, *args, **kwargs) -> torch.Tensor:
    return tensor


def npu_quantize(x, scales, zero_points=None, dtype=torch.qint8, axis=-1, div_mode=True):
    if div_mode:
        q = x.float() / scales.float()
    else:
        q = x.float() * scales.float()
    if zero_points is not None:
        q = q + zero_points.float()
    return torch.round(q).clamp(-128, 127).to(torch.int8)


def npu_dynamic_quant(x, smooth_scales=None, dst_type=torch.int8, **kwargs):
    if dst_type != torch.int8:
        raise NotImplementedError(f"npu_dynamic_quant to {dst_type}: only int8 has a CPU version here")
    xf = x.float()
    if smooth_scales is not None:
        xf = xf * smooth_scales.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return q, scale


def _fp32_of(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.int64:  # fp32 bits in the low 32 bits (deq_scale for fp16)
        return scale.to(torch.int32).view(torch.float32)
    return scale.float()


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
                     output_dtype=None, **kwargs):
    if x1.dtype != torch.int8 or x2.dtype != torch.int8:
        raise NotImplementedError(f"npu_quant_matmul on {x1.dtype} x {x2.dtype}: int8 only here")
    acc = x1.to(torch.int32) @ x2.to(torch.int32)
    out = acc.float()
    if bias is not None and bias.dtype == torch.int32:
        out = (acc + bias).float()
    out = out * _fp32_of(scale).reshape(-1)
    if pertoken_scale is not None:
        out = out * pertoken_scale.float().reshape(-1, 1)
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.float()
    return out.to(output_dtype or torch.float16)


class HcclOptions:
    """``ProcessGroupHCCL.Options``: an attribute holder. vllm-ascend's
    patched ``GroupCoordinator`` passes it to ``new_group`` for every group;
    gloo ignores ``pg_options``."""


# --------------------------------------------------------------------------
# the modules
# --------------------------------------------------------------------------


def _torch_npu_module() -> types.ModuleType:
    mod = _NpuModule("torch_npu")
    mod.__spec__ = importlib.util.spec_from_loader("torch_npu", loader=None)
    mod.__path__ = []
    mod._C = _NpuModule("torch_npu._C")
    c10d = mod._C._distributed_c10d = _NpuModule("torch_npu._C._distributed_c10d")
    c10d.ProcessGroupHCCL = _NpuModule("torch_npu._C._distributed_c10d.ProcessGroupHCCL")
    c10d.ProcessGroupHCCL.Options = HcclOptions
    # the values vllm-ascend's CPU unit-test job uses
    mod.float4_e2m1fn_x2 = 296
    mod.hifloat8 = 290
    mod.float8_e8m0fnu = 293
    mod.npu_format_cast = npu_format_cast
    mod.npu_quantize = npu_quantize
    mod.npu_dynamic_quant = npu_dynamic_quant
    mod.npu_quant_matmul = npu_quant_matmul
    return mod


def _torch_dot_npu() -> types.ModuleType:
    mod = _NpuModule("torch.npu")
    mod.is_available = lambda: False
    mod.current_device = lambda: 0  # one device per process, index 0
    return mod


def _build_info() -> types.ModuleType:
    mod = types.ModuleType("vllm_ascend._build_info")
    mod.__spec__ = importlib.util.spec_from_loader("vllm_ascend._build_info", loader=None)
    mod.__device_type__ = "A2"
    return mod


def _cpu_kernels_for_privateuse1_ops() -> None:
    """Wrap vLLM's ``direct_register_custom_op``: an op registered for
    ``PrivateUse1`` gets the same Python function as its ``CPU`` kernel."""
    import vllm.utils.torch_utils as tu

    if getattr(tu.direct_register_custom_op, "registers_cpu_too", False):
        return
    original = tu.direct_register_custom_op

    def direct_register_custom_op(op_name, op_func, mutates_args=None, fake_impl=None,
                                  target_lib=None, dispatch_key=None, tags=()):
        if dispatch_key is None:
            from vllm.platforms import current_platform

            dispatch_key = current_platform.dispatch_key
        original(op_name, op_func, mutates_args=mutates_args, fake_impl=fake_impl,
                 target_lib=target_lib, dispatch_key=dispatch_key, tags=tags)
        if dispatch_key == "PrivateUse1":
            (target_lib or tu.vllm_lib).impl(op_name, op_func, dispatch_key="CPU")

    direct_register_custom_op.registers_cpu_too = True
    tu.direct_register_custom_op = direct_register_custom_op


class _NoNpuHooks(torch._C._acc.PrivateUse1Hooks):
    """torch's hook interface for a Python-registered PrivateUse1 backend:
    built, never available (no tensor is ever placed on it)."""

    def is_available(self) -> bool:
        return False

    def has_primary_context(self, dev_id) -> bool:
        return False

    def is_built(self) -> bool:
        return True


def _name_privateuse1_npu() -> None:
    if torch._C._get_privateuse1_backend_name() == "npu":
        return
    torch.utils.rename_privateuse1_backend("npu")
    torch._C._acc.register_python_privateuseone_hook(_NoNpuHooks())


def vendored_missing_reason() -> str | None:
    if (VENDORED / "vllm_ascend" / "__init__.py").is_file():
        return None
    return f"vendored vllm-ascend not found at {VENDORED}"


def install() -> bool:
    """Set up this process (idempotent). False, with nothing changed, when
    the vendored folder is missing (the tests then skip, naming the path)."""
    global _installed
    if _installed:
        return True
    if vendored_missing_reason() is not None:
        return False
    os.environ["VLLM_PLUGINS"] = PLUGINS
    os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    paths = [str(ROOT), str(VENDORED), str(SITE)]
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    # spawned gloo workers import the same things
    os.environ["PYTHONPATH"] = os.pathsep.join(
        paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p and p not in paths])

    sys.modules.setdefault("torch_npu", _torch_npu_module())
    sys.modules.setdefault("torch_npu._C", sys.modules["torch_npu"]._C)
    sys.modules.setdefault("torch_npu._C._distributed_c10d",
                           sys.modules["torch_npu"]._C._distributed_c10d)
    _name_privateuse1_npu()
    if not isinstance(getattr(torch, "npu", None), _NpuModule):
        torch.npu = _torch_dot_npu()
        sys.modules["torch.npu"] = torch.npu
    sys.modules.setdefault("vllm_ascend._build_info", _build_info())
    _cpu_kernels_for_privateuse1_ops()
    _installed = True
    return True
