"""``vllm-ascend-ext plan``: published figures, formulas, and the real o_shared op.

The published figures come from the upstream PRs and measurements listed in
the project facts (Qwen3-235B W8A8 at TP16: 2.94 GiB replicated vs 0.25 GiB
with upstream's ring; DeepSeek-V3: 224 MiB per layer, 13.3 / 6.7 GiB per full
copy, all-to-all / reduce-scatter ratio 0.14 at P=16).
"""

from __future__ import annotations

import json
import math

import pytest

from vllm_ascend_ext.tools.planner import model as pl
from vllm_ascend_ext.ops.shared_weight.ring_index import slots_needed
from vllm_ascend_ext.pipeline_stages import pp_stage_ranges
from vllm_ascend_ext.tools.planner.errors import PlanError
from vllm_ascend_ext.tools.planner.model import PlanInputs, plan
from vllm_ascend_ext.tools.planner.shapes import PRESETS, load_model_shape, shape_from_config
from vllm_ascend_ext.tools.planner.text import GIB, MIB, recommend

QWEN235 = PRESETS["qwen3-235b-a22b"]
DSV3 = PRESETS["deepseek-v3"]


# ------------------------------------------------------------ published figures


def test_presets_carry_the_real_config_numbers():
    assert (DSV3.num_layers, DSV3.hidden_size, DSV3.o_proj_in) == (61, 7168, 16384)
    assert (QWEN235.num_layers, QWEN235.hidden_size, QWEN235.o_proj_in) == (94, 4096, 8192)
    q32 = PRESETS["qwen3-32b"]
    assert (q32.num_layers, q32.hidden_size, q32.o_proj_in) == (64, 5120, 8192)


def test_qwen3_235b_w8a8_tp16_published_memory():
    p = plan(QWEN235, PlanInputs(tp=16, weight_dtype="int8", prefetch_step=1))
    mem, W = p["memory"], p["layout"]["per_layer_bytes"]
    assert W == 8192 * 4096 == 32 * MIB
    assert mem["replicated_bytes"] == 94 * W
    assert round(mem["replicated_bytes"] / GIB, 2) == 2.94
    # upstream: ceil(94/16) = 6 owned + (1 + 1) buffers = 8 layers
    assert mem["upstream_bytes"] == 8 * W
    assert mem["upstream_bytes"] / GIB == 0.25
    # ours: ranks 0..13 own 6 layers, 14..15 own 5; one slot each
    assert mem["ours_bytes"] == 7 * W
    assert mem["floor_bytes"] == 94 * W / 16
    # plain TP holds a/P x h per layer: exactly the 1/n floor when k = 1
    assert mem["plain_tp_bytes"] == mem["floor_bytes"]


def test_deepseek_v3_published_memory():
    bf16 = plan(DSV3, PlanInputs(tp=16, weight_dtype="bf16"))
    assert bf16["layout"]["per_layer_bytes"] == 224 * MIB
    assert round(bf16["memory"]["replicated_bytes"] / GIB, 1) == 13.3
    int8 = plan(DSV3, PlanInputs(tp=16, weight_dtype="int8"))
    assert int8["layout"]["per_layer_bytes"] == 112 * MIB
    assert round(int8["memory"]["replicated_bytes"] / GIB, 1) == 6.7


def test_deepseek_v3_p16_fc2_to_fc1_ratio():
    p = plan(DSV3, PlanInputs(tp=16))
    assert p["fc2_to_fc1_ratio"] == pytest.approx(16384 / (16 * 7168))
    assert round(p["fc2_to_fc1_ratio"], 2) == 0.14
    for c in p["comm"]:
        if c["tokens"] % 16 == 0:  # no padding
            assert c["fc2_all_to_all"] / c["fc1_reduce_scatter"] == pytest.approx(0.1428, abs=1e-4)


# ----------------------------------------------------------------- formulas


def test_comm_formulas_with_otp_greater_than_one():
    # TP8, k=2: ODP groups of 4 ranks, OTP groups of 2
    shape = PRESETS["qwen3-32b"]  # a = 8192, h = 5120
    T, b = 4096, 2
    c = pl.comm_per_layer(shape, tp=8, otp=2, act_bytes=b, tokens=T)
    assert c["tp_allreduce"] == 2 * 7 / 8 * T * 5120 * b
    assert c["fc2_all_to_all"] == 3 / 4 * T * (8192 / 8) * b  # [T, a/P] over 4 ranks
    assert c["fc2_otp_reduce_scatter"] == 1 / 2 * (T * 2 / 8) * 5120 * b  # [T*k/P, h] over 2
    assert c["fc2_all_gather"] == 7 / 8 * T * 5120 * b
    assert c["fc2_saved_vs_tp"] == pytest.approx(
        c["fc1_reduce_scatter"] - c["fc2_all_to_all"] - c["fc2_otp_reduce_scatter"])
    assert c["fc2_saved_vs_tp"] / T == pytest.approx(pl.saved_bytes_per_token(shape, 8, 2, b))


def test_int8_all_to_all_halves_the_all_to_all_only():
    # TP16 k=1, DeepSeek-V3: the all-to-all carries int8; dynamic scales add a
    # ring all-reduce of one fp32 per padded token over the 16-rank ODP group.
    T = 4096
    bf16 = pl.comm_per_layer(DSV3, 16, 1, 2, T)
    static = pl.comm_per_layer(DSV3, 16, 1, 2, T, int8_all_to_all="static")
    dynamic = pl.comm_per_layer(DSV3, 16, 1, 2, T, int8_all_to_all="dynamic")
    assert static["fc2_all_to_all"] == bf16["fc2_all_to_all"] / 2
    assert static["fc2_scale_all_reduce"] == bf16["fc2_scale_all_reduce"] == 0
    assert dynamic["fc2_scale_all_reduce"] == 2 * 15 / 16 * T * 4
    for key in ("tp_allreduce", "fc2_otp_reduce_scatter", "fc2_all_gather"):
        assert static[key] == dynamic[key] == bf16[key], key
    ratio = (dynamic["fc2_all_to_all"] + dynamic["fc2_scale_all_reduce"]) / bf16["fc2_all_to_all"]
    assert ratio == pytest.approx(0.5 + 4 / 1024)  # a/P = 1024 bf16 values per token
    p = plan(DSV3, PlanInputs(tp=16, weight_dtype="int8", int8_all_to_all="dynamic"))
    assert p["fc2_saved_bytes_per_token"] == pytest.approx(dynamic["fc2_saved_vs_tp"] / T)


@pytest.mark.parametrize("inputs,match", [
    (PlanInputs(int8_all_to_all="yes"), "--int8-all-to-all must be one of"),
    (PlanInputs(int8_all_to_all="static", act_dtype="int8"), "every collective is int8"),
])
def test_int8_all_to_all_bad_input(inputs, match):
    with pytest.raises(PlanError, match=match):
        plan(DSV3, inputs)


def test_padding_to_a_multiple_of_tp():
    c = pl.comm_per_layer(QWEN235, tp=16, otp=1, act_bytes=2, tokens=17)
    assert c["padded_tokens"] == 32
    assert c["fc2_all_gather"] == 15 / 16 * 32 * 4096 * 2


@pytest.mark.parametrize("storage,moved", [("round_robin", 32 * MIB),
                                           ("tp_shard", 15 / 16 * 32 * MIB)])
def test_break_even_is_where_the_transfer_equals_the_saving(storage, moved):
    """Round-robin broadcasts a whole layer W; TP shards all-gather it, each
    rank sending (P-1)/P W."""
    p = plan(QWEN235, PlanInputs(tp=16, weight_dtype="int8", tokens=(1,), storage=storage))
    per_token = 15 / 16 * 4096 * 2 - 15 / 16 * 512 * 2
    assert p["fc2_saved_bytes_per_token"] == pytest.approx(per_token)  # 6720
    assert p["break_even_tokens"] == pytest.approx(moved / per_token)
    assert p["comm"][0]["oshared_transfer"] == pytest.approx(moved)
    T = 16 * math.ceil(p["break_even_tokens"] / 16)
    at = pl.comm_per_layer(QWEN235, 16, 1, 2, T)["fc2_saved_vs_tp"]
    assert at >= moved > pl.comm_per_layer(QWEN235, 16, 1, 2, T - 16)["fc2_saved_vs_tp"]


# ------------------------------------------------------ the two storages


def test_deepseek_v3_tp16_default_flags_store_plain_tp_plus_one_slot():
    """The default flags (adaptive switch on, o_shared on, storage auto):
    TP shards, plain TP's 61 W / 16 plus one ring slot of W, at most 1.06 GiB
    where round-robin with resident slices held 1.93 GiB."""
    p = plan(DSV3, PlanInputs(tp=16, weight_dtype="bf16"))
    mem, W = p["memory"], p["layout"]["per_layer_bytes"]
    assert mem["storage"] == "tp_shard", mem["storage_reason"]
    assert mem["tp_shard_bytes"] == 61 * W // 16 + W == mem["ours_total_bytes"]
    assert mem["ours_total_bytes"] / GIB <= 1.06
    assert round(mem["round_robin_bytes"] / GIB, 2) == 1.93
    assert mem["round_robin_bytes"] == 5 * W + 61 * W // 16
    assert mem["resident_slice_bytes"] == mem["plain_tp_bytes"]
    assert mem["received_bytes_per_layer"] == 15 * W // 16
    assert mem["round_robin_received_bytes_per_layer"] == W


def test_flashcomm2_alone_keeps_plain_tps_o_proj_for_the_small_steps():
    """Without o_shared the adaptive switch's small side is plain TP's own
    o_proj, kept beside FlashComm2's replicated one (W/P more per layer); with
    the switch off there is none."""
    on = plan(DSV3, PlanInputs(tp=16, weight_dtype="bf16"))["memory"]
    off = plan(DSV3, PlanInputs(tp=16, weight_dtype="bf16", adaptive_tokens=0))["memory"]
    assert on["flashcomm2_bytes"] == on["replicated_bytes"] + on["plain_tp_bytes"]
    assert off["flashcomm2_bytes"] == off["replicated_bytes"]
    from vllm_ascend_ext.tools.planner.text import format_text

    assert "FlashComm2 alone as configured" in format_text(plan(DSV3, PlanInputs(tp=16)))


def test_round_robin_only_where_it_stores_less():
    """A group spanning MoE DP replicas with the threshold at 0 (a prefill-only
    instance): round-robin holds L W / n, less than plain TP's L W / P."""
    spanning = plan(DSV3, PlanInputs(tp=16, dp=2, adaptive_tokens=0))
    assert spanning["memory"]["storage"] == "round_robin"
    assert "spans DP replicas" in spanning["memory"]["storage_reason"]
    assert spanning["memory"]["ours_total_bytes"] == spanning["memory"]["round_robin_bytes"] \
        < spanning["memory"]["tp_shard_bytes"]
    # The same group with the switch on needs plain TP's shard anyway.
    switched = plan(DSV3, PlanInputs(tp=16, dp=2))
    assert switched["memory"]["storage"] == "tp_shard"
    assert switched["memory"]["tp_shard_bytes"] < switched["memory"]["round_robin_bytes"]
    # One replica, threshold 0: the same bytes up to the ring; TP shards win
    # on traffic (a balanced all-gather, not one owner sending everything).
    one = plan(DSV3, PlanInputs(tp=16, adaptive_tokens=0))
    assert one["memory"]["storage"] == "tp_shard"
    # And what a user asks for is what the plan uses.
    forced = plan(DSV3, PlanInputs(tp=16, storage="round_robin"))
    assert forced["memory"]["storage"] == "round_robin"
    assert forced["memory"]["ours_total_bytes"] == forced["memory"]["round_robin_bytes"]
    with pytest.raises(PlanError, match="--storage must be one of"):
        plan(DSV3, PlanInputs(tp=16, storage="shards"))


def test_pp_stages_match_vllm(monkeypatch):
    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    from vllm.distributed.utils import get_pp_indices

    for L, pp in [(61, 2), (94, 4), (5, 2), (64, 3), (7, 5), (10, 1)]:
        ours = pp_stage_ranges(L, pp)
        theirs = [get_pp_indices(L, r, pp) for r in range(pp)]
        assert [(s, s + n) for s, n in ours] == theirs


def test_ring_slots_rule():
    """The planner counts the ring buffers the series allocates (ring_index)."""
    def ring_slots(start, L, n, rank, k):
        return len(slots_needed(start, L, n, rank, k))

    # 5 layers over 2 ranks, k = 3: rank 0 owns 0, 2, 4 and receives 1, 3
    assert ring_slots(0, 5, 2, 0, 3) == len({1 % 3, 3 % 3}) == 2
    assert ring_slots(0, 5, 2, 1, 3) == 3
    assert ring_slots(0, 5, 2, 0, 0) == 1  # synchronous: one buffer
    # at most k buffers, and only those the rank receives into: rank 0 of 2
    # owns the even positions, so with k = 2 it only ever fills slot 1
    assert ring_slots(0, 4, 2, 0, 2) == 1
    assert ring_slots(0, 4, 4, 0, 2) == 2
    # ownership uses the global layer index: a stage starting at layer 3
    assert pl.owned_layers(3, 2, 2, 0) == 1 and ring_slots(3, 2, 2, 0, 1) == 1
    assert ring_slots(0, 3, 1, 0, 1) == 0  # a group of one owns everything


# ------------------------------------------------------ data parallelism


def test_presets_say_whether_they_are_moe():
    assert DSV3.is_moe and QWEN235.is_moe and not PRESETS["qwen3-32b"].is_moe


def test_moe_oshared_group_spans_dp_replicas():
    # DeepSeek-V3 (MoE) at TP16 x DP2: the replicas step in lockstep, so one
    # o_shared group joins both replicas' ODP groups: n = 2 * 16 = 32
    one = plan(DSV3, PlanInputs(tp=16, dp=1))
    two = plan(DSV3, PlanInputs(tp=16, dp=2))
    assert one["layout"]["oshared_group_size"] == 16 and not one["layout"]["oshared_spans_dp"]
    assert two["layout"]["oshared_group_size"] == 32 and two["layout"]["oshared_spans_dp"]
    assert one["layout"]["odp_group_size"] == two["layout"]["odp_group_size"] == 16
    assert two["layout"]["devices"] == 32
    W = two["layout"]["per_layer_bytes"]
    # 61 layers over 32 ranks: at most 2 owned + 1 ring slot (dp 1: 4 + 1)
    assert two["memory"]["ours_bytes"] == 3 * W < one["memory"]["ours_bytes"] == 5 * W
    assert two["memory"]["floor_bytes"] == 61 * W / 32
    assert two["memory"]["upstream_bytes"] == (2 + 1 + 1) * W
    assert two["memory"]["replicated_bytes"] == one["memory"]["replicated_bytes"]
    # FlashComm2's collectives stay inside one replica's ODP group of P/k ranks
    assert two["comm"] == one["comm"]
    assert two["fc2_to_fc1_ratio"] == one["fc2_to_fc1_ratio"]
    assert two["fc2_saved_bytes_per_token"] == one["fc2_saved_bytes_per_token"]
    assert two["break_even_tokens"] == one["break_even_tokens"]


def test_moe_odp_group_stays_p_over_k_with_otp():
    # k = 2 at TP16 x DP4: ODP groups of 8, o_shared groups of 4 * 8 = 32
    one = plan(QWEN235, PlanInputs(tp=16, dp=1, otp_size=2))
    four = plan(QWEN235, PlanInputs(tp=16, dp=4, otp_size=2))
    assert (four["layout"]["odp_group_size"], four["layout"]["oshared_group_size"]) == (8, 32)
    assert four["comm"] == one["comm"]
    assert four["fc2_to_fc1_ratio"] == pytest.approx(
        (7 / 8 * 8192 / 16 + 1 / 16 * 4096) / (15 / 16 * 4096))


def test_dense_oshared_group_stays_in_one_replica():
    q32 = PRESETS["qwen3-32b"]
    one = plan(q32, PlanInputs(tp=16, dp=1))
    two = plan(q32, PlanInputs(tp=16, dp=2))
    assert two["layout"]["oshared_group_size"] == two["layout"]["odp_group_size"] == 16
    assert not two["layout"]["oshared_spans_dp"]
    assert two["layout"]["devices"] == 2 * one["layout"]["devices"]
    assert two["memory"] == one["memory"]
    assert two["comm"] == one["comm"]


@pytest.mark.parametrize("shape,dp,otp", [
    (DSV3, 2, 1), (DSV3, 4, 2), (QWEN235, 2, 4), (PRESETS["qwen3-32b"], 2, 1),
    (PRESETS["qwen3-32b"], 4, 2), (DSV3, 1, 1),
])
def test_group_sizes_match_the_real_group_layout(shape, dp, otp):
    from vllm_ascend_ext.distributed.parallel_state import flashcomm2_group_ranks

    tp, pp = 16, 2
    lay = plan(shape, PlanInputs(tp=tp, dp=dp, pp=pp, otp_size=otp))["layout"]
    groups = flashcomm2_group_ranks(tp * dp * pp, tp, dp, pp, otp,
                                    oshared_spans_dp=shape.is_moe)
    assert {len(g) for g in groups.oshared} == {lay["oshared_group_size"]}
    assert {len(g) for g in groups.odp} == {lay["odp_group_size"]}
    assert lay["devices"] == tp * dp * pp


@pytest.mark.parametrize("key", ["n_routed_experts", "num_experts", "num_local_experts"])
def test_shape_from_config_detects_moe(key):
    base = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8}
    assert shape_from_config({**base, key: 8}).is_moe
    # multimodal wrappers keep the text model's keys under text_config
    assert shape_from_config({"text_config": {**base, key: 8}}).is_moe
    # a zero or absent expert count is a dense model
    assert not shape_from_config({**base, key: 0}).is_moe
    assert not shape_from_config({**base, key: None}).is_moe


def test_shape_from_config_dense_without_expert_keys():
    base = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
            "intermediate_size": 1024, "architectures": ["Qwen3ForCausalLM"]}
    assert not shape_from_config(base).is_moe


def test_cli_text_says_whether_the_group_spans_dp(capsys):
    from vllm_ascend_ext.tools.cli import main

    assert main(["plan", "--model", "deepseek-v3", "--tp", "16", "--dp", "2"]) == 0
    text = capsys.readouterr().out
    assert ("o_shared group n=32 (spans the 2 DP replicas of a PP stage: MoE replicas "
            "step in lockstep)") in text
    assert "per DP replica" not in text
    for argv in (["--model", "deepseek-v3", "--dp", "1"], ["--model", "qwen3-32b", "--dp", "2"]):
        assert main(["plan", "--tp", "16", *argv]) == 0
        text = capsys.readouterr().out
        assert "o_shared group n=16 (per DP replica and PP stage)" in text
        assert "lockstep" not in text


# ------------------------------------------------------------------- timing


def test_broadcast_hidden_or_not():
    # 32 MiB at 1600 Gbit/s (200 GB/s): 167.8 us of transfer, + 10 us latency
    x = dict(tp=16, weight_dtype="int8", link_gbps=1600.0, latency_us=10.0,
             storage="round_robin")
    t = plan(QWEN235, PlanInputs(**x, layer_compute_us=200.0, prefetch_step=1))["timing"]
    assert t["transfer_us"] == pytest.approx(32 * MIB / 200e9 * 1e6)
    assert t["broadcast_us"] == pytest.approx(t["transfer_us"] + 10.0)
    assert t["window_us"] == 200.0 and t["hidden"] and t["exposed_us_per_layer"] == 0
    assert t["min_prefetch_step"] == 1
    # TP shards: each rank takes in 15/16 of the layer, from all the others at once
    t = plan(QWEN235, PlanInputs(**{**x, "storage": "tp_shard"}, layer_compute_us=200.0,
                                 prefetch_step=1))["timing"]
    assert t["transfer_us"] == pytest.approx(15 / 16 * 32 * MIB / 200e9 * 1e6)
    assert t["broadcast_us"] == pytest.approx(t["transfer_us"] + 10.0)

    # layer shorter than the broadcast but longer than the transfer: a deeper ring hides it
    t = plan(QWEN235, PlanInputs(**x, layer_compute_us=170.0, prefetch_step=1))["timing"]
    assert t["throughput_ok"] and not t["latency_ok"] and not t["hidden"]
    assert t["min_prefetch_step"] == 2
    p = plan(QWEN235, PlanInputs(**x, layer_compute_us=170.0, prefetch_step=2))
    assert p["timing"]["hidden"]
    assert "hides the broadcast" in recommend(p)[1]

    # the link cannot move one layer per layer time: no prefetch step helps
    p = plan(QWEN235, PlanInputs(**x, layer_compute_us=100.0, prefetch_step=4))
    assert not p["timing"]["throughput_ok"] and p["timing"]["min_prefetch_step"] is None
    assert "cannot keep up" in recommend(p)[1]

    # synchronous broadcast (k = 0) is always exposed
    t = plan(QWEN235, PlanInputs(**x, layer_compute_us=1000.0, prefetch_step=0))["timing"]
    assert not t["hidden"] and t["exposed_us_per_layer"] == t["broadcast_us"]


def test_no_timing_without_link_and_compute():
    p = plan(QWEN235, PlanInputs(tp=16))
    assert p["timing"] is None
    assert "not assessed" in recommend(p)[1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(tp=16, otp_size=3), "must divide --tp 16"),
    (dict(tp=16, otp_size=16), "smaller than it"),
    (dict(tp=1), "--tp must be >= 2"),
    (dict(tp=48), "not divisible by --tp 48"),
    (dict(tp=16, pp=47, prefetch_step=2), "at most 1"),
    (dict(tp=16, prefetch_step=-1), ">= 0"),
])
def test_invalid_layouts_are_explained(kwargs, match):
    with pytest.raises(PlanError, match=match):
        plan(QWEN235, PlanInputs(**kwargs))


# ---------------------------------------------------------------------- CLI


def test_cli_text_and_json(capsys):
    from vllm_ascend_ext.tools.cli import main

    argv = ["plan", "--model", "qwen3-235b-a22b", "--tp", "16", "--weight-dtype", "int8",
            "--link-gbps", "1600", "--layer-compute-us", "300", "--tokens", "256", "4096"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "2.94 GiB" in text and "0.25 GiB" in text and "recommendation" in text
    assert main(argv + ["--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["memory"]["upstream_bytes"] == 8 * 32 * MIB
    assert [c["tokens"] for c in p["comm"]] == [256, 4096]
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_cli_step_model_section_predicts_ratios_and_a_threshold(capsys):
    from vllm_ascend_ext.tools.cli import main
    from vllm_ascend_ext.tools.planner.link_model import LinkModel
    from vllm_ascend_ext.tools.planner.step_model import (
        ALL_MODES,
        ComputeModel,
        predicted_ratios,
    )

    argv = ["plan", "--model", "deepseek-v3", "--tp", "16", "--link-gbps", "400",
            "--layer-compute-us", "800", "--compute-us-per-token", "0.5", "--tokens", "64",
            "16384", "--prefetch-step", "0"]
    assert main(argv + ["--json"]) == 0
    sm = json.loads(capsys.readouterr().out)["step_model"]
    # prefetch step 0 hides nothing: the whole broadcast is on the step
    assert sm["broadcast_hidden_share"] == 0.0
    link = LinkModel(rate_bytes_per_s=400e9 / 8, latency_s=10e-6, hidden=0.0,
                     broadcast="pipelined")
    want = predicted_ratios(PRESETS["deepseek-v3"], 16, 16384, link,
                            ComputeModel(800e-6, 0.5e-6), 2, 2, 1024)
    # the JSON names the configurations in the model's order
    assert list(sm["rows"][1]["ratios"].values()) == pytest.approx([want[m] for m in ALL_MODES])
    assert sm["rows"][0]["ratios"]["adaptive FlashComm2 k=1 + o_shared"] == 1.0
    th = sm["adaptive_threshold"]
    assert 0 < th["flashcomm2"] < th["flashcomm2_oshared"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "step model" in text and "adaptive threshold from the model" in text
    assert f"VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS={th['flashcomm2_oshared']}" in text
    # without a link rate the section says what it needs
    assert main(["plan", "--model", "deepseek-v3", "--tp", "16"]) == 0
    assert "step model  not assessed" in capsys.readouterr().out
    assert main(argv + ["--compute-us-per-token", "-1"]) == 2
    assert "--compute-us-per-token must be >= 0" in capsys.readouterr().err


# ------------------------------------------------- tiny checkpoints, real op


def test_config_json_of_tiny_checkpoints(tiny_model):
    ds = load_model_shape(str(tiny_model("deepseek_v3")))  # folder -> config.json
    assert (ds.num_layers, ds.hidden_size, ds.num_heads, ds.o_head_dim) == (5, 256, 8, 32)
    assert ds.architecture == "DeepseekV3ForCausalLM"
    qw = load_model_shape(str(tiny_model("qwen3") / "config.json"))
    assert (qw.num_layers, qw.o_proj_in, qw.hidden_size) == (5, 8 * 32, 256)


def test_throughput_benchmark_reports_each_configurations_o_proj_bytes(tiny_model):
    """The throughput benchmark's memory column is the planner's, as configured:
    FlashComm2 alone under the adaptive switch keeps plain TP's o_proj too
    (it reported the full o_proj only, 8,388,608 B on its small preset)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_throughput import _oproj_bytes

    model = str(tiny_model("qwen3"))
    shape = load_model_shape(model)
    L, W = shape.num_layers, shape.o_proj_in * shape.hidden_size * 4
    fc2 = {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1"}
    assert _oproj_bytes(model, 2, {}) == L * W // 2
    assert _oproj_bytes(model, 2, {**fc2, "VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS": "0"}) == L * W
    assert _oproj_bytes(model, 2, fc2) == L * W + L * W // 2
    # o_shared on TP shards: plain TP's shards plus one full o_proj per ring slot
    assert _oproj_bytes(model, 2, {**fc2, "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1"}) == (
        L * W // 2 + W)


def test_throughput_benchmark_brackets_each_round_with_two_plain_tp_runs():
    """The control (plain TP again) runs last in every round, and a
    configuration's bracketed ratio divides by the mean of the round's first
    and last plain-TP runs: drift across a round cancels."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _world import CONTROL, bracketed_ratios
    from bench_throughput import CONFIGS

    assert CONFIGS[0] == ("plain TP", {}) and CONFIGS[-1] == (CONTROL, {})
    # a round that slowed down linearly from 120 to 100 tok/s: a configuration
    # run halfway at 110 is plain TP's equal, not 0.917x of it
    assert bracketed_ratios([110.0], [120.0], [100.0]) == [1.0]
    assert bracketed_ratios([99.0, 120.0], [100.0, 120.0], [100.0, 120.0]) == [0.99, 1.0]


# (first layer, number of layers, prefetch step, pp size, pp rank) on 2 ranks
TINY_CASES = [(0, 5, 1, 1, 0), (0, 5, 2, 1, 0), (0, 5, 3, 1, 0), (0, 5, 0, 1, 0),
              (3, 2, 1, 2, 1)]


def _tiny_series_reports(rank, world_size, cases, a, h):
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import get_tp_group
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    out = []
    with set_current_vllm_config(VllmConfig()):
        for i, (start, L, k, _pp, _stage) in enumerate(cases):
            series = SharedWeightSeries(f"planner-test-{i}", get_tp_group(), prefetch_step=k)
            for j in range(L):
                # the FlashComm2 o_proj shard at k = 1: the full a -> h matrix
                series.add_layer(ReplicatedLinear(
                    a, h, bias=False, params_dtype=torch.bfloat16,
                    prefix=f"model.layers.{start + j}.self_attn.o_proj"))
            series.finalize()
            r = series.memory_report()
            out.append({"resident": r.resident_bytes, "owned": r.owned_layers,
                        "slots": r.slots, "per_layer": r.per_layer_bytes})
            series.close()
    return out


@pytest.mark.timeout(400)
def test_planner_matches_the_real_oshared_op_on_tiny_deepseek(tiny_model):
    from tests.dist_utils import run_distributed

    shape = load_model_shape(str(tiny_model("deepseek_v3")))
    a, h = shape.o_proj_in, shape.hidden_size
    reports = run_distributed(_tiny_series_reports, 2, TINY_CASES, a, h, timeout=300)
    for i, (start, L, k, pp, stage) in enumerate(TINY_CASES):
        p = plan(shape, PlanInputs(tp=2, pp=pp, prefetch_step=k, weight_dtype="bf16"))
        st = p["memory"]["stages"][stage]
        assert (st["start_layer"], st["num_layers"]) == (start, L)
        for rank in range(2):
            got, want = reports[rank][i], st["ranks"][rank]
            assert got["per_layer"] == p["layout"]["per_layer_bytes"] == a * h * 2
            assert (got["owned"], got["slots"]) == (want["owned_layers"], want["slots"]), (
                f"case {TINY_CASES[i]} rank {rank}")
            assert got["resident"] == want["resident_bytes"]
        assert max(r[i]["resident"] for r in reports) == st["ours_max_bytes"]
