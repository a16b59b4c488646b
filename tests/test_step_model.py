"""The step-time model behind the two-host benchmark's predictions (pure)."""

from __future__ import annotations

import pytest

from vllm_ascend_ext.tools.planner.link_model import LinkModel
from vllm_ascend_ext.tools.planner.shapes import ModelShape
from vllm_ascend_ext.tools.planner.step_model import (
    ADAPTIVE,
    ADAPTIVE_OSHARED,
    FLASHCOMM2,
    FLASHCOMM2_OSHARED,
    OprojMode,
    PLAIN_TP,
    TCP_FRAMING,
    ComputeModel,
    adaptive_threshold,
    calibrated_compute_s,
    predicted_ratios,
    step_cost,
    workload_comm,
    workload_steps,
)

# Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
pytestmark = pytest.mark.vllm_independent

SHAPE = ModelShape("small", "Qwen3ForCausalLM", 8, 1024, 16, 128)  # a = 2048
LINK = LinkModel(rate_bytes_per_s=25e6, latency_s=0.0)
# The benchmark's ``small`` preset: 8 heads x head_dim 32, so a = h / 4 and
# FlashComm2 k=1 at TP2 sends 0.5625 of the o_proj all-reduce's bytes.
BENCH = ModelShape("bench-small", "Qwen3ForCausalLM", 8, 1024, 8, 32)


def test_plain_tp_step_is_two_all_reduces_per_layer_plus_the_embedding():
    T, h, b = 32, 1024, 4
    c = step_cost(SHAPE, 2, T, PLAIN_TP, LINK, b, b, 1024)
    per_rank = (2 * 8 + 1) * T * h * b  # ring all-reduce at P=2: T*h*b per rank
    assert c.wire_bytes == 2 * per_rank
    assert c.link_seconds == pytest.approx(per_rank / 25e6)
    assert c.collectives == 17


def test_flashcomm2_replaces_the_o_proj_all_reduce():
    T, h, a, b = 32, 1024, 2048, 4
    c = step_cost(SHAPE, 2, T, FLASHCOMM2, LINK, b, b, 1024)
    o_proj = T / 2 * a / 2 * b + T / 2 * h * b  # all-to-all + all-gather, per rank
    assert c.wire_bytes == pytest.approx(2 * (8 * (o_proj + T * h * b) + T * h * b))


def test_oshared_broadcasts_every_layer_on_large_steps_only_with_the_switch():
    W = 2048 * 1024 * 4
    big = step_cost(SHAPE, 2, 2000, ADAPTIVE_OSHARED, LINK, 4, 4, 1024)
    fc2 = step_cost(SHAPE, 2, 2000, ADAPTIVE, LINK, 4, 4, 1024)
    assert big.wire_bytes - fc2.wire_bytes == 8 * W
    small = step_cost(SHAPE, 2, 32, ADAPTIVE_OSHARED, LINK, 4, 4, 1024)
    plain = step_cost(SHAPE, 2, 32, PLAIN_TP, LINK, 4, 4, 1024)
    assert small == plain  # resident slices: a small step is plain TP
    always = step_cost(SHAPE, 2, 32, FLASHCOMM2_OSHARED, LINK, 4, 4, 1024)
    assert always.wire_bytes > plain.wire_bytes + 8 * W - 1


def test_oshared_broadcasts_add_up_one_layer_after_another():
    W = 256 * 1024 * 4  # the bench preset's o_proj
    round_robin = OprojMode(flashcomm2=True, oshared=True, storage="round_robin")
    for P, fan_out in ((2, 1), (4, 3)):
        for mode, sends in (("flat", fan_out), ("pipelined", 1)):
            link = LinkModel(rate_bytes_per_s=25e6, latency_s=0.0, broadcast=mode)
            fc2 = step_cost(BENCH, P, 4096, FLASHCOMM2, link, 4, 4, 0)
            osh = step_cost(BENCH, P, 4096, round_robin, link, 4, 4, 0)
            # every layer, not only the owner's share: at P=2 each broadcast
            # runs one way while the other direction idles
            assert osh.link_seconds - fc2.link_seconds == pytest.approx(8 * W * sends / 25e6)
    half = LinkModel(rate_bytes_per_s=25e6, latency_s=0.0, hidden=0.5)
    full = step_cost(BENCH, 2, 4096, FLASHCOMM2_OSHARED, LINK, 4, 4, 0)
    fc2 = step_cost(BENCH, 2, 4096, FLASHCOMM2, LINK, 4, 4, 0)
    assert step_cost(BENCH, 2, 4096, FLASHCOMM2_OSHARED, half, 4, 4, 0).link_seconds \
        == pytest.approx(fc2.link_seconds + 0.5 * (full.link_seconds - fc2.link_seconds))


def test_tp_shard_all_gather_moves_p_minus_1_over_p_each_way():
    """TP-shard storage: each layer's all-gather has every rank send and
    receive (P-1)/P W at once, so at P=2 it takes half a broadcast's time."""
    W = 256 * 1024 * 4
    link = LinkModel(rate_bytes_per_s=25e6, latency_s=0.0)
    for P in (2, 4):
        fc2 = step_cost(BENCH, P, 4096, FLASHCOMM2, link, 4, 4, 0)
        osh = step_cost(BENCH, P, 4096, FLASHCOMM2_OSHARED, link, 4, 4, 0)
        assert FLASHCOMM2_OSHARED.storage == "tp_shard"
        assert osh.link_seconds - fc2.link_seconds == pytest.approx(8 * W * (P - 1) / P / 25e6)
        assert osh.wire_bytes - fc2.wire_bytes == pytest.approx(8 * W * (P - 1))


def test_workload_steps_and_calibration():
    assert workload_steps(32, 16, 128, 4096) == [(512, 1), (32, 127)]
    assert workload_steps(32, 512, 4, 4096) == [(4096, 4), (32, 3)]
    steps = workload_steps(32, 16, 128, 4096)
    comm = workload_comm(SHAPE, 2, steps, PLAIN_TP, LINK, 4, 4, 1024)
    assert comm.wire_bytes == pytest.approx(TCP_FRAMING * sum(
        n * step_cost(SHAPE, 2, t, PLAIN_TP, LINK, 4, 4, 1024).wire_bytes for t, n in steps))
    assert calibrated_compute_s(100.0, comm) == pytest.approx(100.0 - comm.link_seconds)
    assert calibrated_compute_s(0.0, comm) == 0.0


def test_predicted_ratio_is_plain_step_time_over_the_configurations():
    compute = ComputeModel(layer_fixed_s=1e-3, layer_per_token_s=1e-6)
    T = 4096
    r = predicted_ratios(BENCH, 2, T, LINK, compute, 4, 4, 1024)
    base = compute.step_s(8, T)
    plain = base + step_cost(BENCH, 2, T, PLAIN_TP, LINK, 4, 4, 1024).link_seconds
    fc2 = base + step_cost(BENCH, 2, T, FLASHCOMM2, LINK, 4, 4, 1024).link_seconds
    assert r[PLAIN_TP] == 1.0
    assert r[FLASHCOMM2] == pytest.approx(plain / fc2)
    # a 4096-token step saves far more than the 4 MiB o_shared broadcasts
    assert r[FLASHCOMM2] > r[FLASHCOMM2_OSHARED] > 1.0
    small = predicted_ratios(BENCH, 2, 64, LINK, compute, 4, 4, 1024)
    assert small[FLASHCOMM2_OSHARED] < 1.0 < small[FLASHCOMM2]
    # at or below the threshold adaptive + o_shared is plain TP exactly
    assert predicted_ratios(BENCH, 2, 8, LINK, compute, 4, 4, 1024)[
        ADAPTIVE_OSHARED] == 1.0


def _first_faster_by_scan(config, link, limit):
    for t in range(1, limit):
        if (step_cost(BENCH, 2, t, config, link, 4, 4, 0).link_seconds
                < step_cost(BENCH, 2, t, PLAIN_TP, link, 4, 4, 0).link_seconds):
            return t
    return None


@pytest.mark.parametrize("latency_s", [0.0, 150e-6])
def test_adaptive_threshold_is_one_below_the_first_step_where_flashcomm2_wins(latency_s):
    link = LinkModel(rate_bytes_per_s=25e6, latency_s=latency_s)
    t = adaptive_threshold(BENCH, 2, link, 4, 4, oshared=False)
    assert t + 1 == _first_faster_by_scan(FLASHCOMM2, link, 5000)
    # o_shared's broadcast of every layer moves the edge far up, and hiding
    # all of it brings it back to FlashComm2's own
    exposed = adaptive_threshold(BENCH, 2, link, 4, 4, oshared=True)
    assert exposed > 10 * t
    hidden = LinkModel(rate_bytes_per_s=25e6, latency_s=latency_s, hidden=1.0)
    assert adaptive_threshold(BENCH, 2, hidden, 4, 4, oshared=True) >= t


def test_adaptive_threshold_is_none_when_flashcomm2_never_sends_less():
    wide = ModelShape("wide-o_proj", "Qwen3ForCausalLM", 8, 256, 16, 128)  # a = 8 h
    assert adaptive_threshold(wide, 2, LINK, 4, 4, oshared=False, max_tokens=1 << 14) is None


def test_an_unknown_broadcast_shape_is_refused():
    with pytest.raises(ValueError, match="broadcast='tree'"):
        LinkModel(rate_bytes_per_s=25e6, broadcast="tree")
