"""FlashComm2's int8 all-to-all: quantizing before the exchange equals quantizing after.

- ``quantize_per_token`` against vLLM CPU's own dynamic int8 quantizer, bit
  for bit (fp32 and bf16 rows, ties included);
- real W8A8 o_projs (vLLM's compressed-tensors method and CPU int8 kernel)
  on real gloo groups: the same layer with the int8 all-to-all on and off
  gives bit-identical outputs, the all-to-all really carries int8, for
  dynamic and static activations, k = 1 and k = 2, on the kernel's oneDNN
  route and on o_shared's plain-weight route;
- the setting's parsing and its start-up errors.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from vllm_ascend_ext.config import (
    ENV_INT8_ALL_TO_ALL,
    FlashComm2ConfigError,
    parse_flashcomm2_config,
    validate_flashcomm2_config,
)
from vllm_ascend_ext.cpu_attention import cpu_has_amx


def test_quantize_per_token_matches_vllm_cpu_kernel():
    from vllm import _custom_ops as ops

    from vllm_ascend_ext.ops.int8_all_to_all import per_token_absmax, quantize_per_token

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(300, 517, generator=g) * torch.rand(300, 1, generator=g) * 8)
        # exact half-steps: x = (n + 0.5) * scale lands on rounding ties
        x[:20] = (torch.randint(-120, 120, (20, 517), generator=g) + 0.5) / 127.0
        x[:20, 0] = 1.0
        x = x.to(dtype)
        want_q, want_s, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
        q, s = quantize_per_token(x, per_token_absmax(x))
        assert torch.equal(s, want_s), dtype
        assert torch.equal(q, want_q), (dtype, int((q != want_q).sum()))
    # FlashComm2's zero padding rows: zeros with scale 0 (no NaN)
    q, s = quantize_per_token(torch.zeros(2, 8), torch.zeros(2))
    assert not q.any() and not s.any()


# --------------------------------------------------------------------------
# real W8A8 layers on gloo
# --------------------------------------------------------------------------

A, H = 256, 128  # o_proj input (heads x v_head_dim) and output sizes


def _w8a8_layer(activations, int8_a2a, plain_route, w_q, w_s, in_scale, *,
                cls=None, symmetric=True, slice_plain=None, **kwargs):
    """A real compressed-tensors W8A8 o_proj (FlashComm2's, or ``cls``) with
    ``w_q``/``w_s``/``in_scale`` loaded and processed as in a bf16 engine.

    ``slice_plain`` (adaptive FlashComm2): keep vLLM's own W8A8
    ``RowParallelLinear`` as the layer's resident slice, as the model
    install does, its int8 weight a plain tensor (True: as TP-shard storage
    keeps it) or in vLLM's kernel format (False: FlashComm2 alone)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    from vllm_ascend_ext.ops.cpu_int8 import keep_int8_weight_plain
    from vllm_ascend_ext.ops.flashcomm2_oproj import FlashComm2RowParallelLinear
    from vllm_ascend_ext.tools.tiny_models.w8a8 import quantization_config

    qcfg = quantization_config("Qwen3ForCausalLM", activations)
    qcfg["config_groups"]["group_0"]["input_activations"]["symmetric"] = symmetric
    qc = CompressedTensorsConfig.from_config(qcfg)
    prefix = "model.layers.0.self_attn.o_proj"
    if cls is None:
        cls = FlashComm2RowParallelLinear
        kwargs["int8_all_to_all"] = int8_a2a
    with set_current_vllm_config(VllmConfig()):
        layer = cls(A, H, bias=False, params_dtype=torch.bfloat16, quant_config=qc,
                    prefix=prefix, **kwargs)
        row_parallel = None
        if slice_plain is not None:
            from vllm.model_executor.layers.linear import RowParallelLinear

            from vllm_ascend_ext.ops.resident_slice import attach_resident_slice

            row_parallel = RowParallelLinear(A, H, bias=False, params_dtype=torch.bfloat16,
                                             quant_config=qc, prefix=prefix)
            if slice_plain:
                method = row_parallel.quant_method
                method.process_weights_after_loading = keep_int8_weight_plain(
                    row_parallel, method.process_weights_after_loading, prefix)
            attach_resident_slice(layer, row_parallel)  # fed by the layer's loaders
    for name, value in (("weight", w_q), ("weight_scale", w_s), ("input_scale", in_scale)):
        param = getattr(layer, name, None)
        if param is not None and value is not None:
            param.weight_loader(param, value)
    post = layer.quant_method.process_weights_after_loading
    if plain_route:  # what o_shared does for its members on this kernel route
        post = keep_int8_weight_plain(layer, post, prefix)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as during a bf16 engine's load
    try:
        post(layer)
        if row_parallel is not None:
            row_parallel.quant_method.process_weights_after_loading(row_parallel)
    finally:
        torch.set_default_dtype(default)
    return layer


def _int8_worker(rank, world_size, k):
    import vllm_ascend_ext.ops.flashcomm2_oproj as op_mod
    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import init_flashcomm2_groups
    from vllm_ascend_ext.tools.tiny_models.w8a8 import quantize_per_channel

    init_flashcomm2_groups(FlashComm2Config(k, False, 1), dp_lockstep=False)
    g = torch.Generator().manual_seed(1)
    w_q, w_s = quantize_per_channel(torch.randn(H, A, generator=g) * 0.05)
    in_scale = torch.tensor([3.0 / 127.0])
    sent = []
    real_a2a = op_mod.all_to_all_dim0

    def spy(x, group):
        sent.append(x.dtype)
        return real_a2a(x, group)

    results = []
    for activations in ("dynamic", "static"):
        for plain in (False, True):
            on = _w8a8_layer(activations, True, plain, w_q, w_s, in_scale)
            off = _w8a8_layer(activations, False, plain, w_q, w_s, in_scale)
            route = on.int8_input()
            for T in (1, 5, 16, 37):
                x = (torch.randn(T, A // world_size, generator=g) * (1 + rank)).to(torch.bfloat16)
                op_mod.all_to_all_dim0 = spy
                try:
                    sent.clear()
                    y_on, _ = on(x)
                    sent_on = list(sent)
                    sent.clear()
                    y_off, _ = off(x)
                    sent_off = list(sent)
                finally:
                    op_mod.all_to_all_dim0 = real_a2a
                results.append({
                    "case": f"{activations} {'plain' if plain else 'kernel'} route T={T}",
                    "route": None if route is None else route.route,
                    "equal": torch.equal(y_on, y_off),
                    "max_diff": float((y_on.float() - y_off.float()).abs().max()),
                    "finite": bool(torch.isfinite(y_on.float()).all()),
                    "sent_on": [str(d) for d in sent_on],
                    "sent_off": [str(d) for d in sent_off],
                })
    return results


@pytest.mark.skipif(cpu_has_amx(), reason="on a CPU with AMX vLLM's int8 kernel quantizes "
                    "inside its AMX matmul (no int8 input); the plain-route cases run in "
                    "tests/e2e/test_w8a8.py's forced non-AMX case there")
@pytest.mark.parametrize("world_size,k", [(2, 1), (4, 2)])
def test_int8_all_to_all_equals_quantizing_after(world_size, k):
    per_rank = run_distributed(_int8_worker, world_size, k, timeout=600)
    for rank, results in enumerate(per_rank):
        for r in results:
            assert r["route"] == ("cpu-plain" if "plain" in r["case"] else "cpu-onednn"), r
            assert r["finite"], (rank, r)
            assert r["equal"], (rank, r)
            assert r["sent_on"] == ["torch.int8"], (rank, r)
            assert r["sent_off"] == ["torch.bfloat16"], (rank, r)


# --------------------------------------------------------------------------
# the setting
# --------------------------------------------------------------------------


def test_setting_defaults_on_and_reads_env_and_additional_config():
    assert parse_flashcomm2_config({}, {}).int8_all_to_all is True
    assert parse_flashcomm2_config({ENV_INT8_ALL_TO_ALL: "0"}, {}).int8_all_to_all is False
    cfg = parse_flashcomm2_config({ENV_INT8_ALL_TO_ALL: "1"},
                                  {"flashcomm2_int8_all_to_all": False})
    assert cfg.int8_all_to_all is False
    assert "int8 all-to-all=off" in cfg.describe()


@pytest.mark.parametrize("env,ac,match", [
    ({ENV_INT8_ALL_TO_ALL: "maybe"}, {}, f"{ENV_INT8_ALL_TO_ALL}='maybe' is invalid"),
    ({}, {"flashcomm2_int8_all_to_all": 2},
     r'additional_config\["flashcomm2_int8_all_to_all"\]=2 is invalid'),
])
def test_setting_rejects_bad_values(env, ac, match):
    with pytest.raises(FlashComm2ConfigError, match=match):
        parse_flashcomm2_config(env, ac)


def test_setting_on_without_flashcomm2_is_refused():
    from types import SimpleNamespace

    cfg = parse_flashcomm2_config({ENV_INT8_ALL_TO_ALL: "1"}, {})
    vcfg = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=2))
    with pytest.raises(FlashComm2ConfigError,
                       match=f"{ENV_INT8_ALL_TO_ALL}='1' is invalid: the int8 all-to-all is "
                             "part of FlashComm2, but FlashComm2 is off"):
        validate_flashcomm2_config(cfg, vcfg, env={})
    validate_flashcomm2_config(parse_flashcomm2_config({ENV_INT8_ALL_TO_ALL: "0"}, {}),
                               vcfg, env={})
