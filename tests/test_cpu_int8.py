"""W8A8 int8 weights kept plain for o_shared on vLLM CPU without AMX
(``vllm_ascend_ext/ops/cpu_int8.py``). The engine-level proof (bit-identical
to vLLM's oneDNN kernel, memory from the workers) is tests/e2e/test_w8a8.py;
these cover the unit's rules with a stand-in for vLLM's kernel object."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vllm_ascend_ext.ops import cpu_int8
from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError

# Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
pytestmark = pytest.mark.vllm_independent

PARAM_NAMES = ("weight", "weight_scale", "input_scale", "input_zero_point", "azp_adj")


def _layer(kernel_cls_name="CPUInt8ScaledMMLinearKernel", symmetric=True, static=False):
    kernel_cls = type(kernel_cls_name, (), {})
    kernel = kernel_cls()
    kernel.layer_param_names = PARAM_NAMES
    kernel.config = SimpleNamespace(input_symmetric=symmetric, is_channelwise=True,
                                    is_static_input_scheme=static)
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randint(-127, 128, (32, 64), dtype=torch.int8),
                                requires_grad=False)
    layer.weight_scale = nn.Parameter(torch.rand(32, 1) / 100, requires_grad=False)
    layer.input_scale = None
    layer.logical_widths = [32]
    layer.scheme = SimpleNamespace(kernel=kernel)
    return layer, kernel


@pytest.fixture
def no_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_other_methods_keep_their_post_load(no_amx):
    layer, _ = _layer(kernel_cls_name="SomeOtherKernel")
    post = object()
    assert cpu_int8.keep_int8_weight_plain(layer, post, "l0") is post


def test_amx_route_keeps_its_post_load(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    layer, kernel = _layer()
    post = object()
    assert not cpu_int8.takes_onednn_route(layer, kernel)
    assert cpu_int8.keep_int8_weight_plain(layer, post, "l0") is post


def test_asymmetric_activations_are_refused_at_registration(no_amx):
    layer, _ = _layer(symmetric=False)
    with pytest.raises(SharedWeightError,
                       match=r"layer 'model.layers.3.self_attn.o_proj'.*asymmetric int8"):
        cpu_int8.keep_int8_weight_plain(layer, object(), "model.layers.3.self_attn.o_proj")


def test_onednn_route_keeps_a_plain_int8_weight_and_int_mm_matches(no_amx):
    layer, kernel = _layer()
    w, scale = layer.weight.detach().clone(), layer.weight_scale.detach().clone()
    process = cpu_int8.keep_int8_weight_plain(layer, object(), "l0")
    process(layer)
    # a plain [K, N] int8 tensor and a flat fp32 scale: what a series broadcasts
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (64, 32)
    assert torch.equal(layer.weight, w.t()) and layer.weight_scale.shape == (32,)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    got = kernel.linear_method(layer, x)
    # reference: per-token symmetric int8 activations, exact int32 GEMM, fp32 scales
    x32 = x.float()
    x_s = x32.abs().amax(dim=1, keepdim=True) / 127
    x_q = torch.round(x32 / x_s).clamp(-128, 127)
    ref = ((x_q @ w.t().float()) * x_s * scale.t()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 32)
    torch.testing.assert_close(got, ref, atol=0.02, rtol=0.02)
