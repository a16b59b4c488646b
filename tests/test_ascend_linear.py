"""Contract 6 (docs/ascend.md): our o_proj runs the linear method that
vllm-ascend's own ``AscendRowParallelLinear`` runs.

vllm-ascend is not installable here, so its module is played by a stand-in
whose method subclasses vLLM's ``UnquantizedLinearMethod`` exactly as the real
``AscendUnquantizedLinearMethod`` does (``vllm_ascend/ops/linear.py`` 83); the
layer is vLLM's real class hierarchy with stub groups.
"""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest
from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from vllm_ascend_ext.ops import ascend_linear
from vllm_ascend_ext.ops.ascend_linear import platform_linear_method
from vllm_ascend_ext.ops.flashcomm2_oproj import FlashComm2RowParallelLinear


class _StandInAscendUnquantizedLinearMethod(UnquantizedLinearMethod):
    """vllm-ascend's method, played: NZ cast at post-load (here: a marker)."""

    def process_weights_after_loading(self, layer):
        layer.nz_cast = True


@pytest.fixture
def vllm_ascend_installed(monkeypatch):
    pkg, ops, linear = ModuleType("vllm_ascend"), ModuleType("vllm_ascend.ops"), \
        ModuleType("vllm_ascend.ops.linear")
    linear.AscendUnquantizedLinearMethod = _StandInAscendUnquantizedLinearMethod
    pkg.ops, ops.linear = ops, linear
    for name, mod in (("vllm_ascend", pkg), ("vllm_ascend.ops", ops),
                      ("vllm_ascend.ops.linear", linear)):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.fixture(autouse=True)
def tp_state(monkeypatch):
    """vLLM's parameters read the TP rank at creation; no TP world here."""
    import vllm.model_executor.parameter as parameter

    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 2)


def _groups():
    stub = SimpleNamespace
    return dict(tp_group=stub(world_size=2, rank_in_group=0, unique_name="tp"),
                otp_group=stub(world_size=1, rank_in_group=0, unique_name="otp"),
                odp_group=stub(world_size=2, rank_in_group=0, unique_name="odp"))


def test_off_ascend_the_layer_keeps_vllms_method():
    assert not ascend_linear.on_ascend()  # vLLM CPU: device_type "cpu"
    layer = FlashComm2RowParallelLinear(64, 32, bias=False, **_groups())
    assert type(layer.quant_method) is UnquantizedLinearMethod


def test_on_ascend_the_layer_gets_vllm_ascends_unquantized_method(monkeypatch,
                                                                  vllm_ascend_installed):
    monkeypatch.setattr(ascend_linear, "on_ascend", lambda: True)
    layer = FlashComm2RowParallelLinear(64, 32, bias=False, **_groups())
    assert type(layer.quant_method) is _StandInAscendUnquantizedLinearMethod
    # its weights were created by that method, with the FlashComm2 shapes (k=1: full)
    assert layer.weight.shape == (32, 64)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.nz_cast


def test_quantized_methods_are_left_to_the_quant_config(vllm_ascend_installed):
    quantized = SimpleNamespace()  # e.g. vllm-ascend's AscendLinearMethod
    assert platform_linear_method(quantized, ascend=True) is quantized
    plain = UnquantizedLinearMethod()
    assert platform_linear_method(plain, ascend=False) is plain
    assert type(platform_linear_method(plain, ascend=True)) is \
        _StandInAscendUnquantizedLinearMethod


def test_the_npu_platform_is_recognised(monkeypatch):
    import vllm.platforms

    monkeypatch.setattr(vllm.platforms, "current_platform",
                        SimpleNamespace(device_type="npu"))
    assert ascend_linear.on_ascend()
