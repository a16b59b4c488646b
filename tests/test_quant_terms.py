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

    method_cls = _ascend_linear_method_class()

    class QuantConfig:
        online_quantization_config = None  # read by vLLM 0.32's resolve_quant_method

        def get_quant_method(self, layer, prefix):
            return method_cls()

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
