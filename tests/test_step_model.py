"""The step-time model behind the two-host benchmark's predictions (pure)."""

from __future__ import annotations

import pytest

from vllm_ascend_ext.planner import ModelShape
from vllm_ascend_ext.step_model import (
    TCP_FRAMING,
    LinkModel,
    calibrated_compute_s,
    step_cost,
    workload_comm,
    workload_steps,
)

SHAPE = ModelShape("small", "Qwen3ForCausalLM", 8, 1024, 16, 128)  # a = 2048
LINK = LinkModel(rate_bytes_per_s=25e6, latency_s=0.0)


def test_plain_tp_step_is_two_all_reduces_per_layer_plus_the_embedding():
    T, h, b = 32, 1024, 4
    c = step_cost(SHAPE, 2, T, "plain TP", LINK, b, b, 1024)
    per_rank = (2 * 8 + 1) * T * h * b  # ring all-reduce at P=2: T*h*b per rank
    assert c.wire_bytes == 2 * per_rank
    assert c.link_seconds == pytest.approx(per_rank / 25e6)
    assert c.collectives == 17


def test_flashcomm2_replaces_the_o_proj_all_reduce():
    T, h, a, b = 32, 1024, 2048, 4
    c = step_cost(SHAPE, 2, T, "FlashComm2 k=1", LINK, b, b, 1024)
    o_proj = T / 2 * a / 2 * b + T / 2 * h * b  # all-to-all + all-gather, per rank
    assert c.wire_bytes == pytest.approx(2 * (8 * (o_proj + T * h * b) + T * h * b))


def test_oshared_broadcasts_every_layer_on_large_steps_only_with_the_switch():
    W = 2048 * 1024 * 4
    big = step_cost(SHAPE, 2, 2000, "adaptive FlashComm2 k=1 + o_shared", LINK, 4, 4, 1024)
    fc2 = step_cost(SHAPE, 2, 2000, "adaptive FlashComm2 k=1", LINK, 4, 4, 1024)
    assert big.wire_bytes - fc2.wire_bytes == 8 * W
    small = step_cost(SHAPE, 2, 32, "adaptive FlashComm2 k=1 + o_shared", LINK, 4, 4, 1024)
    plain = step_cost(SHAPE, 2, 32, "plain TP", LINK, 4, 4, 1024)
    assert small == plain  # resident slices: a small step is plain TP
    always = step_cost(SHAPE, 2, 32, "FlashComm2 k=1 + o_shared", LINK, 4, 4, 1024)
    assert always.wire_bytes > plain.wire_bytes + 8 * W - 1


def test_workload_steps_and_calibration():
    assert workload_steps(32, 16, 128, 4096) == [(512, 1), (32, 127)]
    assert workload_steps(32, 512, 4, 4096) == [(4096, 4), (32, 3)]
    steps = workload_steps(32, 16, 128, 4096)
    comm = workload_comm(SHAPE, 2, steps, "plain TP", LINK, 4, 4, 1024)
    assert comm.wire_bytes == pytest.approx(TCP_FRAMING * sum(
        n * step_cost(SHAPE, 2, t, "plain TP", LINK, 4, 4, 1024).wire_bytes for t, n in steps))
    assert calibrated_compute_s(100.0, comm) == pytest.approx(100.0 - comm.link_seconds)
    assert calibrated_compute_s(0.0, comm) == 0.0
