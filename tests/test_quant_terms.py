"""Rank-dependent additive terms of a quant method land once per output sum
(docs/ascend.md, contract 2), on a real 4-rank gloo world with vLLM's groups.

``AscendLinearMethod`` below reproduces, with vLLM's own ``LinearMethodBase``,
how vllm-ascend's wrapper (``quantization/method_adapters.py``) reads the rank
for any ``RowParallelLinear`` (the global TP rank) and how its W8A8-static
scheme uses it (``quant_bias`` added only when ``tp_rank == 0``). Plain TP is
vLLM's ``RowParallelLinear`` with the same method; FlashComm2 at k=1 and k=2
must give the same outputs.
"""

from __future__ import annotations

import torch

from tests.dist_utils import run_distributed

A, H, T = 64, 48, 9  # T not a multiple of 4: padding rows too


class W8A8StaticLikeScheme:
    """The scheme: ``apply(layer, x, bias, tp_rank)``; the per-layer term is
    added on rank 0 only, as W8A8-static adds ``quant_bias``."""

    def apply(self, layer, x, bias, tp_rank):
        y = torch.nn.functional.linear(x, layer.weight, bias)
        if tp_rank == 0:
            y = y + layer.quant_bias
        return y


def _ascend_linear_method_class():
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.model_executor.layers.linear import LinearMethodBase, RowParallelLinear
    from vllm.model_executor.utils import set_weight_attrs

    class AscendLinearMethod(LinearMethodBase):
        def __init__(self):
            self.quant_method = W8A8StaticLikeScheme()

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes,
                           input_size, output_size, params_dtype, **extra):
            weight = torch.nn.Parameter(
                torch.empty(sum(output_partition_sizes), input_size_per_partition),
                requires_grad=False)
            set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
            set_weight_attrs(weight, extra)
            layer.register_parameter("weight", weight)
            layer.register_parameter("quant_bias", torch.nn.Parameter(
                torch.empty(sum(output_partition_sizes)), requires_grad=False))

        def process_weights_after_loading(self, layer):
            pass

        def apply(self, layer, x, bias=None):
            # vllm-ascend: the global TP rank for any RowParallelLinear.
            tp_rank = get_tensor_model_parallel_rank() if isinstance(
                layer, RowParallelLinear) else 0
            return self.quant_method.apply(layer, x, bias, tp_rank)

    return AscendLinearMethod


def _quant_config_class(method_cls):
    """A quant config that gives every linear layer a fresh ``method_cls``."""

    class QuantConfig:
        online_quantization_config = None  # read by vLLM 0.32's resolve_quant_method

        def get_quant_method(self, layer, prefix):
            return method_cls()

    return QuantConfig


def _worker(rank, world_size):
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        return _compare(rank, world_size)


def _compare(rank, world_size):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import (
        destroy_flashcomm2_groups,
        init_flashcomm2_groups,
    )
    from vllm_ascend_ext.ops.flashcomm2_oproj import FlashComm2RowParallelLinear

    QuantConfig = _quant_config_class(_ascend_linear_method_class())

    g = torch.Generator().manual_seed(7)
    w, qb = torch.randn(H, A, generator=g), torch.randn(H, generator=g)
    x = torch.randn(T, A, generator=g)
    a_l = A // world_size
    x_local = x[:, rank * a_l:(rank + 1) * a_l]

    def load(layer):
        layer.weight.weight_loader(layer.weight, w)
        layer.quant_bias.data.copy_(qb)

    # plain TP: vLLM's RowParallelLinear, same method, all-reduce
    plain = RowParallelLinear(A, H, bias=False, quant_config=QuantConfig(),
                              prefix="model.layers.0.self_attn.o_proj")
    load(plain)
    ref = plain(x_local)[0]
    out = {"plain_vs_math": float((ref - (x @ w.T + qb)).abs().max())}
    for k in (1, 2):
        init_flashcomm2_groups(FlashComm2Config(parallel_size=k))
        try:
            layer = FlashComm2RowParallelLinear(A, H, bias=False, quant_config=QuantConfig(),
                                                prefix="model.layers.0.self_attn.o_proj")
            load(layer)
            y = layer(x_local)[0]
            out[f"k={k}"] = float((y - ref).abs().max())
        finally:
            destroy_flashcomm2_groups()
    return out


def test_quant_bias_once_per_output_sum_matches_plain_tp():
    for r in run_distributed(_worker, 4, tp_size=4, timeout=200):
        assert r["plain_vs_math"] < 1e-4, r  # the reproduction adds quant_bias once
        assert r["k=1"] < 1e-4, r
        assert r["k=2"] < 1e-4, r


# --------------------------------------------------------------------------
# W8A8-static with an activation offset: int8 all-to-all and adaptive switch
# --------------------------------------------------------------------------

SCALE, OFFSET, THRESHOLD = 0.05, 7, 4


def _quantize_standin(x, scale, scale_reciprocal, offset):
    """vllm-ascend's ``torch.ops.vllm.quantize`` (``npu_quantize`` with per-
    channel vectors): ``round(x * 1/s) + offset``, saturated to int8."""
    q = torch.round(x.float() * scale_reciprocal.float()) + offset.float()
    return q.clamp(-128, 127).to(torch.int8)


class AscendW8A8LinearMethod:
    """The W8A8-static scheme as vllm-ascend has it (``w8a8_static.py``): it
    quantizes with vllm-ascend's op unless the input is int8 already, and adds
    ``quant_bias`` (here ``-offset * sum(W)``, cancelling the offset) on
    ``tp_rank == 0``."""

    def apply(self, layer, x, bias, tp_rank):
        if x.dtype != torch.int8:
            x = torch.ops.vllm.quantize(x, layer.aclnn_input_scale,
                                        layer.aclnn_input_scale_reciprocal,
                                        layer.aclnn_input_offset)
        y = x.float() @ layer.weight.float().t()
        if tp_rank == 0:
            y = y + layer.quant_bias
        return y * SCALE


def _offset_method_class():
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.model_executor.layers.linear import LinearMethodBase, RowParallelLinear
    from vllm.model_executor.utils import set_weight_attrs

    class AscendLinearMethod(LinearMethodBase):
        def __init__(self):
            self.quant_method = AscendW8A8LinearMethod()

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes,
                           input_size, output_size, params_dtype, **extra):
            weight = torch.nn.Parameter(
                torch.empty(sum(output_partition_sizes), input_size_per_partition,
                            dtype=torch.int8), requires_grad=False)
            set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
            set_weight_attrs(weight, extra)
            layer.register_parameter("weight", weight)
            layer.register_parameter("quant_bias", torch.nn.Parameter(
                torch.empty(sum(output_partition_sizes)), requires_grad=False))
            # process_weights_after_loading's per-channel vectors, over K
            k_cols = input_size_per_partition
            for name, value in (("aclnn_input_scale", SCALE),
                                ("aclnn_input_scale_reciprocal", 1 / SCALE),
                                ("aclnn_input_offset", float(OFFSET))):
                layer.register_parameter(name, torch.nn.Parameter(
                    torch.full((k_cols,), value), requires_grad=False))

        def process_weights_after_loading(self, layer):
            pass

        def apply(self, layer, x, bias=None):
            tp_rank = get_tensor_model_parallel_rank() if isinstance(
                layer, RowParallelLinear) else 0
            return self.quant_method.apply(layer, x, bias, tp_rank)

    return AscendLinearMethod


def _offset_worker(rank, world_size):
    from vllm.config import VllmConfig, set_current_vllm_config

    import vllm_ascend_ext.ops.flashcomm2_oproj as op_mod
    import vllm_ascend_ext.ops.int8_all_to_all as i8

    lib = torch.library.Library("vllm", "FRAGMENT")  # noqa: TID251
    if not hasattr(torch.ops.vllm, "quantize"):
        lib.define("quantize(Tensor x, Tensor s, Tensor rs, Tensor o) -> Tensor")
        lib.impl("quantize", _quantize_standin, "CPU")
    # The Ascend route is chosen by device type "npu"; these layers live on CPU.
    route = i8._ascend_route
    i8.int8_input_of = op_mod.int8_input_of = route
    with set_current_vllm_config(VllmConfig()):
        return _offset_compare(rank, world_size)


def _offset_compare(rank, world_size):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import (
        destroy_flashcomm2_groups,
        init_flashcomm2_groups,
    )
    from vllm_ascend_ext.ops.flashcomm2_oproj import FlashComm2RowParallelLinear

    QuantConfig = _quant_config_class(_offset_method_class())

    g = torch.Generator().manual_seed(11)
    w = torch.randint(-20, 20, (H, A), generator=g, dtype=torch.int8)
    quant_bias = -OFFSET * w.float().sum(dim=1)
    a_l = A // world_size

    def load(layer):
        layer.weight.weight_loader(layer.weight, w)
        layer.quant_bias.data.copy_(quant_bias)

    plain = RowParallelLinear(A, H, bias=False, quant_config=QuantConfig(),
                              prefix="model.layers.0.self_attn.o_proj")
    load(plain)
    out = {}
    for k in (1, 2):
        init_flashcomm2_groups(FlashComm2Config(parallel_size=k), dp_lockstep=False)
        try:
            layer = FlashComm2RowParallelLinear(
                A, H, bias=False, quant_config=QuantConfig(), int8_all_to_all=True,
                adaptive_tokens=THRESHOLD, prefix="model.layers.0.self_attn.o_proj")
            load(layer)
            for T in (2, THRESHOLD, 9):  # small side, small side, FlashComm2
                x = torch.randn(T, A, generator=g)
                x_local = x[:, rank * a_l:(rank + 1) * a_l]
                ref = plain(x_local)[0]
                exact = (torch.round(x / SCALE) @ w.float().t()) * SCALE
                y = layer(x_local)[0]
                out[f"k={k} T={T}"] = (float((y - ref).abs().max()),
                                       float((ref - exact).abs().max()),
                                       layer.int8_input().route)
        finally:
            destroy_flashcomm2_groups()
    return out


def test_offset_w8a8_static_int8_all_to_all_and_adaptive_small_side():
    """An activation offset (a float zero quantizes to ``offset``): the int8
    all-to-all and the switch's zero-padded small side equal plain TP. Before
    the small side padded in int8, it was off by ``(P-1) * offset * sum(W)``."""
    for rank, r in enumerate(run_distributed(_offset_worker, 4, tp_size=4, timeout=300)):
        for case, (gap, plain_vs_exact, route) in r.items():
            assert route == "ascend-static", (rank, case, route)
            assert plain_vs_exact < 1e-3, (rank, case, plain_vs_exact)
            assert gap < 1e-3, (rank, case, gap)
