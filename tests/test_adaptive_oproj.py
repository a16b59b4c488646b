"""Adaptive FlashComm2 on real gloo groups: plain TP's own o_proj at or below
the threshold, FlashComm2 above it, loaded from the same checkpoint tensors.

- fp32 layers at TP2 (k=1) and TP4 (k=1, k=2), with and without o_shared
  (round-robin), with a bias, full and sequence-parallel outputs: every
  token count on both sides of the threshold matches the float64 reference;
  below it the resident slice runs, with vLLM's TP all-reduce and no
  all-to-all, above it the reverse;
- torch.compile(fullgraph, dynamic) over batches on both sides: one graph,
  no recompilation, both sides taken;
- real W8A8 layers (vLLM's compressed-tensors method): the small side is
  vLLM's own ``RowParallelLinear`` bit for bit, in vLLM's kernel format
  (FlashComm2 alone) and with the plain int8 weight TP-shard storage keeps
  (exact int8 arithmetic).
"""

from __future__ import annotations

import pytest
import torch

from cpu_features import cpu_has_int8_vnni, int8_vnni_skip_reason
from tests.dist_utils import run_distributed
from vllm_ascend_ext.cpu_attention import cpu_has_amx

A, H, THRESHOLD, LAYERS = 64, 48, 8, 3
T_VALUES = (1, 5, 8, 9, 23)


def _reference(x, w, b):
    ref = x.double() @ w.double().t()
    return ref if b is None else ref + b.double()


def _spies(op_mod, tp_group):
    calls = {"all_to_all": 0, "all_reduce": 0, "row_parallel": 0}
    real = (op_mod.all_to_all_dim0, tp_group.all_reduce, op_mod.run_resident_slice)

    def a2a(x, group):
        calls["all_to_all"] += group.world_size > 1
        return real[0](x, group)

    def all_reduce(x):
        calls["all_reduce"] += 1
        return real[1](x)

    def row_parallel(layer, x, sp):
        calls["row_parallel"] += 1
        return real[2](layer, x, sp)

    op_mod.all_to_all_dim0 = a2a
    tp_group.all_reduce = all_reduce
    op_mod.run_resident_slice = row_parallel

    def restore():
        op_mod.all_to_all_dim0 = real[0]
        del tp_group.all_reduce
        op_mod.run_resident_slice = real[2]

    return calls, restore


def _fp32_worker(rank, world_size, k, oshared):
    import vllm_ascend_ext.ops.flashcomm2_oproj as op_mod
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import get_tp_group
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import (
        get_flashcomm2_oshared_group,
        init_flashcomm2_groups,
    )
    from vllm_ascend_ext.models.flashcomm2_install import flashcomm2_o_proj_for, join_series
    from vllm_ascend_ext.ops.resident_slice import attach_resident_slice, resident_slice_of
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    cfg = FlashComm2Config(k, oshared, 1, adaptive_tokens=THRESHOLD)
    init_flashcomm2_groups(cfg, dp_lockstep=False)
    P, a_l = world_size, A // world_size
    series = (SharedWeightSeries(f"adaptive-{k}", get_flashcomm2_oshared_group(), 1)
              if oshared else None)
    layers = []
    with set_current_vllm_config(VllmConfig()):
        for i in range(LAYERS):
            # vLLM's o_proj, and the FlashComm2 one that the model install puts
            # in its place, keeping vLLM's as the small side (o_shared: with
            # the layer in the round-robin series).
            name = f"model.layers.{i}.self_attn.o_proj"
            old = RowParallelLinear(A, H, bias=True, params_dtype=torch.float32, prefix=name)
            new = flashcomm2_o_proj_for(old, cfg, name)
            if oshared:
                join_series(new, old, cfg, series, i)
            else:
                attach_resident_slice(new, old)
            layers.append(new)
    g = torch.Generator().manual_seed(3)
    weights = [(torch.randn(H, A, generator=g), torch.randn(H, generator=g)) for _ in layers]
    for layer, (w, b) in zip(layers, weights):
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
    for layer in layers:
        for module in layer.modules():  # vLLM's pass: the layer, then its slice
            module.quant_method.process_weights_after_loading(module)
    slices = sum(resident_slice_of(layer) is not None for layer in layers)
    # A layer built outside the install, with no plain-TP o_proj attached.
    with set_current_vllm_config(VllmConfig()):
        bare = op_mod.FlashComm2RowParallelLinear(
            A, H, bias=False, params_dtype=torch.float32, adaptive_tokens=THRESHOLD,
            prefix="model.layers.9.self_attn.o_proj")
    try:
        bare(torch.zeros(2, a_l))
        missing = None
    except RuntimeError as e:
        missing = str(e)

    tp = get_tp_group()
    calls, restore = _spies(op_mod, tp)
    out = []
    try:
        for p in range(2):  # o_shared: the second pass wraps the ring
            for T in T_VALUES:
                for l, layer in enumerate(layers):
                    w, b = weights[l]
                    x = torch.randn(T, A, generator=g)
                    ref = _reference(x, w, b)
                    x_local = x[:, rank * a_l:(rank + 1) * a_l]
                    sp = (T + l + p) % 2 == 1
                    before = dict(calls)
                    y, _ = layer(x_local, sequence_parallel_output=sp)
                    if sp:
                        blk = -(-T // P)
                        ref = torch.cat([ref, b.double().expand(blk * P - T, H)])
                        ref = ref[rank * blk:(rank + 1) * blk]
                    delta = {c: calls[c] - before[c] for c in calls}
                    out.append({
                        "case": f"pass={p} T={T} layer={l} sp={sp}",
                        "small": T <= THRESHOLD,
                        "err": float((y.double() - ref).abs().max() / ref.abs().max()),
                        "shape_ok": tuple(y.shape) == tuple(ref.shape),
                        "calls": delta,
                    })
    finally:
        restore()

    # compiled: one graph for batches on both sides of the threshold
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    dynamo.reset()
    layer, (w, b) = layers[0], weights[0]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    calls, restore = _spies(op_mod, tp)
    errs = []
    try:
        for T in (3, 30, 2, 17, 8):
            x = torch.randn(T, A, generator=g)
            y = compiled(x[:, rank * a_l:(rank + 1) * a_l])[0]
            errs.append(float((y.double() - _reference(x, w, b)).abs().max()))
            if series is not None:  # keep the ring's order: run the other layers too
                for other in layers[1:]:
                    other(x[:, rank * a_l:(rank + 1) * a_l])
    finally:
        restore()
    compiled_frames = counter.frame_count
    return {"cases": out, "slices": slices, "missing": missing, "compiled_errs": errs,
            "compiled_frames": compiled_frames,
            "compiled_row_parallel_calls": calls["row_parallel"]}


@pytest.mark.parametrize("world_size,k,oshared", [(2, 1, False), (2, 1, True), (4, 2, True),
                                                   (4, 1, False)])
def test_switch_matches_reference_on_both_sides(world_size, k, oshared):
    per_rank = run_distributed(_fp32_worker, world_size, k, oshared, timeout=600)
    for rank, res in enumerate(per_rank):
        assert res["slices"] == LAYERS, res["slices"]
        # without one, the first small pass names the layer and the fix
        assert res["missing"].startswith(
            "'model.layers.9.self_attn.o_proj': adaptive FlashComm2 runs small passes through "
            "plain TP's o_proj, but none was attached"), res["missing"]
        for c in res["cases"]:
            assert c["shape_ok"], (rank, c)
            assert c["err"] < 1e-5, (rank, c)
            if c["small"]:
                assert c["calls"]["row_parallel"] == 1, (rank, c)
                assert c["calls"]["all_to_all"] == 0, (rank, c)
                # vLLM's RowParallelLinear all-reduces; a token-sharded output
                # is this rank's block of the sum
                assert c["calls"]["all_reduce"] == 1, (rank, c)
            else:
                assert c["calls"]["row_parallel"] == 0, (rank, c)
                assert c["calls"]["all_reduce"] == 0, (rank, c)
                assert c["calls"]["all_to_all"] == (1 if world_size // k > 1 else 0), (rank, c)
        assert max(res["compiled_errs"]) < 1e-3, res["compiled_errs"]
        assert res["compiled_frames"] == 1, res  # one trace for every batch size
        # batches 3, 2 and 8 took the small side, 30 and 17 FlashComm2 (with
        # o_shared the other layers run too, eagerly, to keep the ring's order)
        assert res["compiled_row_parallel_calls"] == 3 * (LAYERS if oshared else 1), res


# --------------------------------------------------------------------------
# W8A8: the small side keeps the per-output-channel scales right
# --------------------------------------------------------------------------


def _exact_w8a8_row_parallel(x, w_q, w_s, in_scale, rank, world_size):
    """Plain TP's W8A8 o_proj in exact arithmetic: this rank's activations
    quantized by vLLM's own CPU quantizer, an int64 matmul with its input
    slice of the int8 weight, the scales in float64, summed over the ranks."""
    import torch.distributed as dist
    from vllm import _custom_ops as ops

    x_q, x_s, _ = ops.onednn_scaled_int8_quant(x, in_scale, None, True)
    k = w_q.shape[1] // world_size
    w_slice = w_q[:, rank * k:(rank + 1) * k].to(torch.int64)
    part = (x_q.to(torch.int64) @ w_slice.T).double()
    part = part * x_s.double().reshape(-1, 1) * w_s.double().reshape(1, -1)
    dist.all_reduce(part)
    return part


def _w8a8_worker(rank, world_size):
    from test_int8_all_to_all import A as QA
    from test_int8_all_to_all import H as QH
    from test_int8_all_to_all import _w8a8_layer
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import init_flashcomm2_groups
    from vllm_ascend_ext.tools.tiny_models.w8a8 import quantize_per_channel

    init_flashcomm2_groups(FlashComm2Config(1, False, 1), dp_lockstep=False)
    g = torch.Generator().manual_seed(5)
    w_q, w_s = quantize_per_channel(torch.randn(QH, QA, generator=g) * 0.05)
    in_scale = torch.tensor([3.0 / 127.0])
    out = []
    for activations, symmetric in (("dynamic", True), ("static", True), ("dynamic", False)):
        scale = in_scale if activations == "static" else None
        tp_ref = _w8a8_layer(activations, False, False, w_q, w_s, scale, cls=RowParallelLinear,
                             symmetric=symmetric)
        # The slice in vLLM's kernel format (FlashComm2 alone), and as TP-shard
        # storage keeps it: a plain int8 tensor (symmetric activations only).
        for plain in ((False, True) if symmetric else (False,)):
            layer = _w8a8_layer(activations, True, False, w_q, w_s, scale, symmetric=symmetric,
                                slice_plain=plain, adaptive_tokens=THRESHOLD)
            for T in (1, 4, 8):
                x = (torch.randn(T, QA // world_size, generator=g) * (1 + rank)).to(torch.bfloat16)
                y, _ = layer(x)
                want, _ = tp_ref(x)
                exact = _exact_w8a8_row_parallel(x, w_q, w_s, scale, rank, world_size)
                out.append({"case": f"{activations}{'' if symmetric else ' asymmetric'} "
                                    f"{'plain' if plain else 'vLLM format'} T={T}",
                            "equal": torch.equal(y, want),
                            "max_diff": float((y.float() - want.float()).abs().max()),
                            "max_diff_exact": float((y.double() - exact).abs().max()),
                            "scale": float(want.float().abs().max())})
    return out


@pytest.fixture(scope="module")
def w8a8_small_side():
    return run_distributed(_w8a8_worker, 2, timeout=600)


def test_w8a8_small_side_is_vllms_own_row_parallel(w8a8_small_side):
    """With the slice in vLLM's kernel format (FlashComm2 alone), the small
    side is vLLM's W8A8 RowParallelLinear at the same TP, bit for bit, on
    every CPU kind (the same kernel on the same bytes)."""
    for rank, results in enumerate(w8a8_small_side):
        checked = [r for r in results if "vLLM format" in r["case"]]
        assert len(checked) == 9
        for r in checked:
            assert r["equal"], (rank, r)


_NO_AMX = pytest.mark.skipif(
    cpu_has_amx(), reason="needs a CPU without AMX (amx_tile): with AMX vLLM's int8 kernel "
    "keeps a VNNI-packed weight, not the plain int8 tensor compared here")


@_NO_AMX
def test_w8a8_plain_slice_is_plain_tps_int8_arithmetic(w8a8_small_side):
    """TP-shard storage's plain int8 slice computes plain TP's W8A8 product
    exactly (bf16 output rounding only) on any CPU without AMX."""
    for rank, results in enumerate(w8a8_small_side):
        checked = [r for r in results if "plain" in r["case"]]
        assert len(checked) == 6
        for r in checked:
            assert r["max_diff_exact"] <= 2 ** -7 * r["scale"], (rank, r)


@_NO_AMX
@pytest.mark.skipif(not cpu_has_int8_vnni(), reason=int8_vnni_skip_reason())
def test_w8a8_plain_slice_matches_vllm_row_parallel(w8a8_small_side):
    """Where vLLM's oneDNN int8 GEMM is exact, the plain int8 slice gives vLLM's
    RowParallelLinear numbers (bf16 output rounding only). Without VNNI its
    saturating pair sums are not exact, so the two cannot agree."""
    for rank, results in enumerate(w8a8_small_side):
        for r in results:
            assert r["max_diff"] <= 2 ** -7 * r["scale"], (rank, r)


# --------------------------------------------------------------------------
# the setting
# --------------------------------------------------------------------------


def test_setting_default_env_and_additional_config():
    from vllm_ascend_ext.config import (
        DEFAULT_ADAPTIVE_TOKENS,
        ENV_ADAPTIVE_TOKENS,
        parse_flashcomm2_config,
    )

    assert parse_flashcomm2_config({}, {}).adaptive_tokens == DEFAULT_ADAPTIVE_TOKENS
    assert parse_flashcomm2_config({ENV_ADAPTIVE_TOKENS: "0"}, {}).adaptive_tokens == 0
    cfg = parse_flashcomm2_config({ENV_ADAPTIVE_TOKENS: "5"}, {"flashcomm2_adaptive_tokens": 32})
    assert cfg.adaptive_tokens == 32
    assert "adaptive threshold=32 tokens" in cfg.describe()


@pytest.mark.parametrize("env,ac,match", [
    ({"VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS": "-1"}, {},
     "VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS='-1' is invalid: the adaptive FlashComm2 "
     "threshold must be a non-negative integer number of tokens"),
    ({}, {"flashcomm2_adaptive_tokens": "many"},
     r'additional_config\["flashcomm2_adaptive_tokens"\]=.many. is invalid'),
    ({}, {"flashcomm2_adaptive_tokens": True}, "is invalid"),
])
def test_setting_rejects_bad_values(env, ac, match):
    from vllm_ascend_ext.config import FlashComm2ConfigError, parse_flashcomm2_config

    with pytest.raises(FlashComm2ConfigError, match=match):
        parse_flashcomm2_config(env, ac)


def test_setting_without_flashcomm2_is_refused():
    from types import SimpleNamespace

    from vllm_ascend_ext.config import (
        FlashComm2ConfigError,
        parse_flashcomm2_config,
        validate_flashcomm2_config,
    )

    vcfg = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=2))
    cfg = parse_flashcomm2_config({"VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS": "16"}, {})
    with pytest.raises(FlashComm2ConfigError, match="adaptive FlashComm2 switches between "
                       "FlashComm2 and plain TP, but FlashComm2 is off"):
        validate_flashcomm2_config(cfg, vcfg, env={})
    # the default (and an explicit 0) with FlashComm2 off is fine
    validate_flashcomm2_config(parse_flashcomm2_config({}, {}), vcfg, env={})


def test_layer_refuses_skip_bias_add_with_the_switch():
    from vllm.config import VllmConfig, set_current_vllm_config

    from tests.test_flashcomm2_oproj import _stub_groups
    from vllm_ascend_ext.ops.flashcomm2_oproj import FlashComm2RowParallelLinear

    with set_current_vllm_config(VllmConfig()), pytest.raises(
            ValueError, match="skip_bias_add with a bias is not supported with adaptive"):
        FlashComm2RowParallelLinear(A, H, bias=True, skip_bias_add=True, adaptive_tokens=4,
                                    **_stub_groups(2, 1, 0))

