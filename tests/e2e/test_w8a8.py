"""W8A8 checkpoints through vLLM's real quant methods, with FlashComm2 and o_shared.

The checkpoints are compressed-tensors W8A8 (int8 per-channel weights; int8
activations, dynamic per token or static per tensor) written from the fp32
tiny models
(``vllm_ascend_ext/tools/tiny_models/w8a8.py``); vLLM runs them through
``CompressedTensorsLinearMethod`` and its CPU int8 kernel, in bf16, at TP2.

vLLM CPU's int8 kernel splits by CPU kind: with AMX the weight is a plain
VNNI-packed tensor; without AMX it sits in a oneDNN handle, and o_shared keeps
it a plain int8 tensor instead (``vllm_ascend_ext/ops/cpu_int8.py``). The
native run takes whichever path this CPU has; on an AMX CPU a second run
forces the non-AMX path, so both run in CI on such machines.

Rules, per checkpoint and path, all engines bf16:
- noise floor: plain TP1 vs plain TP2, measured in the same run; FlashComm2
  k=1 must stay within it (plus a margin);
- o_shared (prefetch steps 1 and 2) runs the same int8 arithmetic as
  FlashComm2 without it, so it must match it exactly;
- FlashComm2's all-to-all carries int8 where the kernel takes int8 input
  (the default); with it turned off (bf16 on the wire) the logprobs must be
  the same, exactly: quantizing before the exchange rounds like quantizing
  after it (``ops/int8_all_to_all.py``);
- greedy continuations by the harness rule against plain TP2;
- o_proj bytes read from the workers: plain TP's int8 shards plus the ring
  slots on the oneDNN path (TP-shard storage), the owned int8 layers plus ring
  slots on the AMX path (round-robin), scales included.
"""

from __future__ import annotations

import pytest

from tests.cpu_features import cpu_has_int8_vnni
from tests.e2e.harness import (
    MEMORY_RPC,
    assert_greedy_close,
    assert_prompt_logprobs_close,
    flashcomm2_flags,
    max_prompt_logprob_diff,
)
from vllm_ascend_ext.config import ENV_INT8_ALL_TO_ALL
from vllm_ascend_ext.cpu_attention import AMX_FEATURE, cpu_has_amx

# Plain TP1 vs plain TP2 on the same W8A8 checkpoint, bf16, on the trained
# tiny models, measured on an AMD EPYC (no AMX; oneDNN int8 path): Qwen3
# 9.7e-05 nats (static scales: 3.11e-02), DeepSeek-V3 (int8 o_proj only)
# 4.60e-02. Each figure here is that measurement rounded up to 0.01 nats, the
# resolution a floor needs. The random checkpoints of before gave 0.293,
# 0.357 and 1.079 (greedy near-ties everywhere); no trained figure has been
# measured on an AMX CPU (AMX bf16, VNNI int8), so those stay in force there.
NO_AMX_NOISE_FLOOR = {("Qwen3ForCausalLM", "dynamic"): 0.01,
                      ("Qwen3ForCausalLM", "static"): 0.04,
                      ("DeepseekV3ForCausalLM", "dynamic"): 0.05}
AMX_NOISE_FLOOR = {("Qwen3ForCausalLM", "dynamic"): 0.293,
                   ("Qwen3ForCausalLM", "static"): 0.357,
                   ("DeepseekV3ForCausalLM", "dynamic"): 1.079}
# FlashComm2 is one more reduction order: it may deviate from plain TP2 by the
# floor (the larger of this run's and the figure above) plus this share. On
# the trained models it deviated by 0.91x (Qwen3), 1.00x (static) and 1.32x
# (DeepSeek-V3) of this run's floor; 0.01x, 0.78x and 1.21x of the figure.
FLOOR_MARGIN = 0.5
# A floor far above the measured one means the checkpoint or kernel broke.
FLOOR_SANITY = 3.0

# One o_proj layer: int8 [K=256, N=256] + fp32 per-channel scale [256], and for
# a static scheme the scalar input scale (64-byte aligned in the packed slot).
INT8_OPROJ_BYTES = {"dynamic": 256 * 256 + 256 * 4, "static": 256 * 256 + 256 * 4 + 64}
#: One layer's TP2 shard: half the int8 weight, the fp32 per-channel scale and
#: (static) the fp32 input scale.
TP_SHARD_INT8_BYTES = {"dynamic": 256 * 128 + 256 * 4, "static": 256 * 128 + 256 * 4 + 4}

VARIANTS = {
    "FC2 k=1": flashcomm2_flags(1),
    "FC2 k=1 bf16 all-to-all": {**flashcomm2_flags(1), ENV_INT8_ALL_TO_ALL: "0"},
    "FC2 k=1 o_shared step 1": flashcomm2_flags(1, True, 1),
    "FC2 k=1 o_shared step 2": flashcomm2_flags(1, True, 2),
    # prefill (~40 tokens) FlashComm2, decode (3 tokens) plain row-parallel
    "FC2 k=1 o_shared adaptive": flashcomm2_flags(1, True, 1, adaptive=8),
}
NATIVE, FORCED_NO_AMX = "native", "non-AMX path forced"


# Prefetch step 2 changes only the ring, already swept elsewhere, and the
# adaptive switch's W8A8 arithmetic is swept at op level: one case runs them.
STEP2_CASE = ("Qwen3ForCausalLM", "dynamic", NATIVE)


def _runs(engines, arch, path, activations):
    pretend = None if path == NATIVE else False
    variants = {n: e for n, e in VARIANTS.items()
                if not ("step 2" in n or "adaptive" in n) or (arch, activations, path) == STEP2_CASE}
    return {
        name: engines.run(arch, tp=tp, env=env, dtype="bfloat16", w8a8=activations,
                          pretend_amx=pretend)
        for name, tp, env in [("plain TP1", 1, None), ("plain TP2", 2, None),
                              *[(n, 2, e) for n, e in variants.items()]]
    }


@pytest.mark.parametrize("arch,activations,path", [
    ("Qwen3ForCausalLM", "dynamic", NATIVE),
    ("Qwen3ForCausalLM", "dynamic", FORCED_NO_AMX),
    ("Qwen3ForCausalLM", "static", NATIVE),
    ("DeepseekV3ForCausalLM", "dynamic", NATIVE),
])
def test_w8a8_flashcomm2_and_oshared_match_plain_tp(arch, activations, path, engines):
    if path == FORCED_NO_AMX and not cpu_has_amx():
        pytest.skip(f"needs a CPU with AMX ({AMX_FEATURE}) to force off; this CPU takes "
                    "the non-AMX int8 path natively")
    runs = _runs(engines, arch, path, activations)
    floor = max_prompt_logprob_diff(runs["plain TP1"].outputs, runs["plain TP2"].outputs)
    # Even the forced non-AMX int8 run does its bf16 work on AMX there.
    measured = (AMX_NOISE_FLOOR if cpu_has_amx() else NO_AMX_NOISE_FLOOR)[(arch, activations)]
    assert floor <= FLOOR_SANITY * measured, (
        f"plain TP1 vs TP2 differ by {floor:.3f} nats (measured before: {measured})")
    ref = runs["plain TP2"].outputs
    fc2 = runs["FC2 k=1"]
    tolerance = max(floor, measured) * (1 + FLOOR_MARGIN)
    gap = assert_prompt_logprobs_close(ref, fc2.outputs, atol=tolerance,
                                       names=("plain TP2", "FC2 k=1"))
    assert_greedy_close(ref, fc2.outputs, names=("plain TP2", "FC2 k=1"))
    # The kernel's oneDNN route takes int8 input; on AMX it quantizes inside
    # its own matmul, so the all-to-all stays bf16 there.
    int8_route = path == FORCED_NO_AMX or not cpu_has_amx()
    # Where vLLM's int8 GEMM is exact (AMX's VNNI-packed kernel, or oneDNN with
    # int8 VNNI), o_shared's int8 layers give FlashComm2's numbers bit for bit.
    int8_gemm_exact = cpu_has_amx() or cpu_has_int8_vnni()
    assert {r for w in fc2.rpc[MEMORY_RPC] for r in w["int8_all_to_all_routes"]} == \
        ({"cpu-onednn"} if int8_route else {"off"})
    bf16_wire = runs["FC2 k=1 bf16 all-to-all"]
    assert {r for w in bf16_wire.rpc[MEMORY_RPC] for r in w["int8_all_to_all_routes"]} == {"off"}
    assert_prompt_logprobs_close(bf16_wire.outputs, fc2.outputs, atol=0.0,
                                 names=("FC2 k=1 bf16 all-to-all", "FC2 k=1"))
    assert [o["token_ids"] for o in bf16_wire.outputs] == [o["token_ids"] for o in fc2.outputs]
    if "FC2 k=1 o_shared adaptive" in runs:
        # Decode steps run plain TP's own int8 o_proj, kept resident beside
        # the series (no ring read).
        got = runs["FC2 k=1 o_shared adaptive"]
        assert_prompt_logprobs_close(ref, got.outputs, atol=tolerance,
                                     names=("plain TP2", "FC2 k=1 o_shared adaptive"))
        assert_greedy_close(ref, got.outputs, names=("plain TP2", "FC2 k=1 o_shared adaptive"))
        for worker in got.rpc[MEMORY_RPC]:
            side = worker["adaptive"]
            assert side["flashcomm2_calls"] > 0 and side["row_parallel_calls"] > 0, side
            assert side["layers_with_resident_slice"] == worker["o_proj_layers"], worker
    for name in [n for n in runs if "o_shared" in n and "adaptive" not in n]:
        got = runs[name]
        assert {r for w in got.rpc[MEMORY_RPC] for r in w["int8_all_to_all_routes"]} == \
            ({"cpu-plain"} if int8_route else {"off"})
        if int8_gemm_exact:
            assert_prompt_logprobs_close(fc2.outputs, got.outputs, atol=0.0,
                                         names=("FC2 k=1", name))
            assert [o["token_ids"] for o in got.outputs] == [o["token_ids"] for o in fc2.outputs]
        else:
            # o_shared's plain int8 layers accumulate exactly (torch._int_mm);
            # vLLM's oneDNN kernel without VNNI saturates its int16 pair sums,
            # so FlashComm2 alone rounds differently: judged like FC2 itself.
            assert_prompt_logprobs_close(ref, got.outputs, atol=tolerance,
                                         names=("plain TP2", name))
            assert_greedy_close(ref, got.outputs, names=("plain TP2", name))
        for worker in got.rpc[MEMORY_RPC]:
            assert worker["o_proj_classes"] == ["FlashComm2RowParallelLinear"], worker
            rep = worker["series_report"]
            if int8_route:
                # TP shards: vLLM's int8 shard of every layer (kept a plain int8
                # tensor) plus one gathered int8 weight per slot; the scales
                # stay the shard's own.
                assert worker["oshared_storage"] == "tp_shard", worker
                assert rep["gathered_bytes_per_layer"] == 256 * 256, rep
                assert rep["slot_bytes"] == rep["slots"] * 256 * 256, rep
                assert rep["shard_bytes"] == 5 * TP_SHARD_INT8_BYTES[activations], rep
                assert worker["o_proj_total_bytes"] == rep["shard_bytes"] + rep["slot_bytes"]
                continue
            # AMX's VNNI-packed weight declares nothing to gather: round-robin.
            assert worker["oshared_storage"] == "round_robin", worker
            assert rep["resident_bytes"] == (rep["owned_layers"] + rep["slots"]) * \
                rep["per_layer_bytes"], rep
            assert worker["o_proj_storage_bytes"] == rep["resident_bytes"], worker
            # VNNI-packed int8 plus scales: int8-sized, not bf16-sized
            assert INT8_OPROJ_BYTES["dynamic"] <= rep["per_layer_bytes"] < 2 * 256 * 256, rep
        if not int8_route:
            assert sorted(w["series_report"]["owned_layers"]
                          for w in got.rpc[MEMORY_RPC]) == [2, 3]
    print(f"\n{arch} W8A8 {activations} bf16 ({path}): floor TP1-TP2 {floor:.3e}, FC2 vs TP2 {gap:.3e}, "
          "o_shared vs FC2 0.0, int8 vs bf16 all-to-all 0.0")
