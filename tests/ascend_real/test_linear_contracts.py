"""Contracts 2, 4, 6, 8 and 9 (docs/ascend.md) against vllm-ascend main's own
linear methods: ``AscendUnquantizedLinearMethod``, and ``AscendLinearMethod``
around ``AscendW8A8LinearMethod`` (static) / ``AscendW8A8DynamicLinearMethod``
from the real ``AscendModelSlimConfig``, on 2 gloo ranks (k=1) and 4 (k=1,
k=2). Plain TP is vLLM's ``RowParallelLinear`` as vllm-ascend builds it
(``AscendRowParallelLinear``) with the same config; "whole" is the whole
layer on one rank through the same real ``apply``.

Tolerances: FlashComm2 k=1 computes each output sum in one int32 matmul, so
it equals the whole layer bit for bit; plain TP (and k=2) add bf16 partial
sums, so they differ from it by bf16 rounding (``bf16_ulps``). The terms
these contracts are about are far larger: a missing ``quant_bias`` is ~20 %
of the output (asserted below through the real wrapper's own rank read).
"""

from __future__ import annotations

import math

import pytest

from tests.ascend_real import layers as L
from tests.ascend_real.worlds import result

WORLDS = {"2 ranks": ("two_rank_world", (1,)), "4 ranks": ("four_rank_world", (1, 2))}
METHODS = {
    "unquantized": ("AscendUnquantizedLinearMethod", None),
    "W8A8": ("AscendLinearMethod", "AscendW8A8LinearMethod"),
    "W8A8_DYNAMIC": ("AscendLinearMethod", "AscendW8A8DynamicLinearMethod"),
}


def bf16_ulps(n: float, scale: float) -> float:
    """``n`` bf16 units in the last place at magnitude ``scale`` (8 significant bits)."""
    return n * 2.0 ** (math.floor(math.log2(scale)) - 7)


@pytest.fixture(params=list(WORLDS), ids=list(WORLDS))
def world(request):
    fixture, ks = WORLDS[request.param]
    return request.getfixturevalue(fixture), ks


def test_our_layer_gets_vllm_ascends_methods_and_weights(world):
    """Contract 6: the method each layer gets, and the tensors that method
    creates and leaves after process_weights_after_loading, are plain TP's
    (vllm-ascend's own layer), with this layer's a/k input columns."""
    ranks, ks = world
    for r in result(ranks, "methods and weights"):
        for scheme, expected in METHODS.items():
            row = r[scheme]
            assert row["plain_class"] == "AscendRowParallelLinear"
            assert tuple(row["plain"]["methods"]) == expected
            for k in ks:
                ours = row[f"k={k}"]
                assert tuple(ours["methods"]) == expected, (scheme, k)
                assert ours["input_columns"] == L.A // k
                assert ours["before"] == row["plain"]["before"], (scheme, k)
                assert ours["after"] == row["plain"]["after"], (scheme, k)
        # what vllm-ascend's W8A8-static post-processing leaves: the int8
        # weight transposed to [K, h], deq_scale fp32, its input-scale vectors
        # over K, two of them plain attributes (neither parameter nor buffer)
        static = r["W8A8"]["k=1"]
        assert static["before"]["weight"] == ("param", "torch.int8", ("h", "K"))
        assert static["after"]["weight"] == ("param", "torch.int8", ("K", "h"))
        assert static["after"]["deq_scale"] == ("param", "torch.float32", ("h",))
        assert static["after"]["aclnn_input_scale"] == ("param", "torch.bfloat16", ("K",))
        for name in ("aclnn_input_scale_reciprocal", "aclnn_input_offset"):
            assert static["after"][name] == ("attribute", "torch.bfloat16", ("K",))
        dynamic = r["W8A8_DYNAMIC"]["k=1"]
        assert dynamic["after"]["weight"] == ("param", "torch.int8", ("K", "h"))
        assert dynamic["after"]["weight_scale_fp32"] == ("attribute", "torch.float32", ("h",))


def test_flashcomm2_with_the_real_w8a8_apply_matches_plain_tp(world):
    """Contracts 2 and 8: k=1 equals the whole layer exactly, with and without
    the int8 all-to-all (W8A8-static's apply takes the int8 input); k=2 and
    plain TP within bf16 rounding of it. The real wrapper reading the global
    TP rank itself would drop quant_bias on every rank but 0."""
    ranks, ks = world
    for rank, r in enumerate(result(ranks, "flashcomm2 vs plain tp")):
        for scheme in ("W8A8", "W8A8_DYNAMIC"):
            for k in ks:
                for int8 in (True, False):
                    for T in (1, 9):
                        c = r[f"{scheme} k={k} int8={int8} T={T}"]
                        case = (rank, scheme, k, int8, T, c)
                        if k == 1:
                            assert c["vs_whole"] == 0.0, case
                        assert c["vs_whole"] <= bf16_ulps(2, c["scale"]), case
                        assert c["vs_plain"] <= bf16_ulps(2, c["scale"]), case
                        assert c["plain_vs_whole"] <= bf16_ulps(2, c["scale"]), case
                        # the real apply computes the layer (int8 rounding only)
                        assert c["float_vs_whole"] <= 0.03 * c["scale"], case
                        want = "ascend-static" if scheme == "W8A8" and int8 else None
                        assert c["route"] == want, case
            own = r[f"{scheme} wrapper's own rank"]
            if scheme == "W8A8" and rank > 0:
                assert own["gap"] > 0.05 * own["scale"], (rank, own)
            else:  # rank 0, or a scheme without rank-0 terms
                assert own["gap"] == 0.0, (rank, scheme, own)


def test_adaptive_small_side_on_the_real_static_scheme_matches_plain_tp(world):
    """Contract 9: at most ADAPTIVE_TOKENS tokens run plain TP's own o_proj,
    vllm-ascend's AscendRowParallelLinear with its W8A8-static method (input
    offset 7), loaded through the FlashComm2 layer's loaders: it equals a
    separately built plain TP layer exactly (no NZ weight is sliced)."""
    from tests.ascend_real.linear_checks import ADAPTIVE_TOKENS

    ranks, ks = world
    for r in result(ranks, "adaptive small side"):
        for k in ks:
            assert r[f"k={k} slice"].endswith(".AscendRowParallelLinear"), r[f"k={k} slice"]
            assert r[f"k={k} calls"] == [1, 2]  # T=9 FlashComm2; T=2, 4 row-parallel
            for T in (2, ADAPTIVE_TOKENS):
                assert r[f"k={k} T={T}"]["gap"] == 0.0, (k, T, r[f"k={k} T={T}"])
            big = r[f"k={k} T=9"]
            assert big["gap"] <= bf16_ulps(2, big["scale"]), (k, big)


def test_oshared_over_the_real_w8a8_static_method(world):
    """Contract 4 (without NZ: npu_format_cast is the identity here, so the NZ
    padding stays with tests/test_slot_storage.py's stand-in): the ring slots
    hold what vllm-ascend's post-processing leaves, its plain attributes stay
    per layer, and the outputs equal FlashComm2 without o_shared exactly."""
    ranks, ks = world
    for k in ks:
        for r in result(ranks, f"o_shared k={k}"):
            assert r["max_gap"] == 0.0, r["max_gap"]
            assert r["routes"] == ["ascend-static"]
            owned = [lay["owned"] for lay in r["layers"]]
            assert r["memory"]["owned"] == sum(owned)
            assert r["memory"]["resident"] == (
                (r["memory"]["owned"] + r["memory"]["slots"]) * r["memory"]["per_layer"])
            for lay in r["layers"]:
                assert lay["state"] == lay["alone_state"]
                params = sorted(n for n, (kind, _, _) in lay["state"].items() if kind == "param")
                assert lay["params_in_slot"] == ([] if lay["owned"] else params), lay
                assert lay["state"]["weight"] == ("param", "torch.int8", ("K", "h"))
                assert lay["state"]["aclnn_input_offset"][0] == "attribute"
                assert lay["attributes_match_alone"]


def test_tp_shard_oshared_over_the_real_w8a8_methods(world):
    """TP-shard storage on 2 and 4 ranks (k = 1, 2): every rank keeps the real
    AscendRowParallelLinear shard, FlashComm2's weight is all-gathered as the
    real method declares, and the outputs equal FlashComm2 without o_shared
    exactly; small steps run the shard and equal plain TP."""
    ranks, ks = world
    P = len(ranks)
    for k in ks:
        for r in result(ranks, f"tp-shard o_shared k={k}"):
            assert r["declared_by"] == {
                "unquantized": "AscendUnquantizedLinearMethod.tp_weight_gather_specs "
                               "(vllm-ascend)",
                "W8A8": "AscendW8A8LinearMethod.tp_weight_gather_specs (vllm-ascend)",
                "W8A8_DYNAMIC": "AscendW8A8DynamicLinearMethod.tp_weight_gather_specs "
                                "(vllm-ascend)"}, r["declared_by"]
            for scheme in ("W8A8", "W8A8_DYNAMIC"):
                got = r[scheme]
                assert got["max_gap"] == 0.0, (scheme, k, got)
                assert got["small_max_gap"] == 0.0, (scheme, k, got)
                assert got["gathered"] == ["weight"]
                assert got["repeated"] == ([
                    "aclnn_input_scale", "aclnn_input_scale_reciprocal", "aclnn_input_offset"]
                    if scheme == "W8A8" else [])
                assert got["routes"] == (["ascend-static"] if scheme == "W8A8" else ["None"])
                # nothing of FlashComm2's own: the layer's weight is the slot
                D = P // k
                assert got["slot_weight_shape"] == [L.A // k, L.H]  # [K, N] int8, transposed
                assert got["memory"]["group"] == D and got["memory"]["slots"] == 1
                assert got["memory"]["gathered"] == (L.A // k) * L.H
                # two passes, each one large step per layer (9 tokens)
                assert all(c == [2, 2] for c in got["calls"]), got["calls"]
                assert got["gathers"] == 1 + 2 * 4
