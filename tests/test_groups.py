"""FlashComm2 group layout (pure) and the group lifecycle's error paths.

Live group creation on real gloo worlds is exercised in
tests/test_flashcomm2_oproj.py (TP4, DP2xTP2 and PP2xTP2 worlds).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_ascend_ext.config import FlashComm2Config
from vllm_ascend_ext.distributed.parallel_state import (
    FlashComm2GroupError,
    destroy_flashcomm2_groups,
    flashcomm2_group_ranks,
    flashcomm2_groups_initialized,
    get_flashcomm2_odp_group,
    get_flashcomm2_oshared_group,
    get_flashcomm2_otp_group,
    init_flashcomm2_groups,
    split_tp_group,
    vllm_tp_group_ranks,
)

# Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
pytestmark = pytest.mark.vllm_independent

# world, tp, dp, pp, k -> expected tp / otp / odp (o_shared == odp always)
LAYOUTS = [
    ("TP8-k2", (8, 8, 1, 1, 2),
     [[0, 1, 2, 3, 4, 5, 6, 7]],
     [[0, 4], [1, 5], [2, 6], [3, 7]],
     [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("DP2xTP4-k2", (8, 4, 2, 1, 2),
     [[0, 1, 2, 3], [4, 5, 6, 7]],
     [[0, 2], [1, 3], [4, 6], [5, 7]],
     [[0, 1], [2, 3], [4, 5], [6, 7]]),
    ("TP4xPP2-k1", (8, 4, 1, 2, 1),
     [[0, 1, 2, 3], [4, 5, 6, 7]],
     [[0], [1], [2], [3], [4], [5], [6], [7]],
     [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("TP4xPP2-k2", (8, 4, 1, 2, 2),
     [[0, 1, 2, 3], [4, 5, 6, 7]],
     [[0, 2], [1, 3], [4, 6], [5, 7]],
     [[0, 1], [2, 3], [4, 5], [6, 7]]),
    ("TP4-k1", (4, 4, 1, 1, 1),
     [[0, 1, 2, 3]],
     [[0], [1], [2], [3]],
     [[0, 1, 2, 3]]),
    # Without lockstep (FACTS: dense DP replicas are independent engines) an
    # o_shared group stays inside one replica: [[0,1],[2,3]], never [0..3].
    ("DP2xTP2-k1", (4, 2, 2, 1, 1),
     [[0, 1], [2, 3]],
     [[0], [1], [2], [3]],
     [[0, 1], [2, 3]]),
    ("TP16-k4", (16, 16, 1, 1, 4),
     [list(range(16))],
     [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]],
     [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]),
]


@pytest.mark.parametrize("args,tp,otp,odp", [c[1:] for c in LAYOUTS],
                         ids=[c[0] for c in LAYOUTS])
def test_layout(args, tp, otp, odp):
    g = flashcomm2_group_ranks(*args)
    assert g.tp == tp
    assert g.otp == otp
    assert g.odp == odp
    assert g.oshared == odp


# MoE replicas step in lockstep: o_shared joins ODP group j of every replica of
# one PP stage, replica-major (world, tp, dp, pp, k) -> o_shared.
LOCKSTEP_LAYOUTS = [
    ("DP2xTP2-k1", (4, 2, 2, 1, 1), [[0, 1, 2, 3]]),
    ("DP2xTP4-k2", (8, 4, 2, 1, 2), [[0, 1, 4, 5], [2, 3, 6, 7]]),
    ("DP2xPP2xTP2-k1", (8, 2, 2, 2, 1), [[0, 1, 4, 5], [2, 3, 6, 7]]),
    ("DP1xTP4-k2", (4, 4, 1, 1, 2), [[0, 1], [2, 3]]),
    ("extDP2xDP2xTP2-k1", (8, 2, 2, 1, 1), [[0, 1, 2, 3], [4, 5, 6, 7]]),
]


@pytest.mark.parametrize("args,oshared", [c[1:] for c in LOCKSTEP_LAYOUTS],
                         ids=[c[0] for c in LOCKSTEP_LAYOUTS])
def test_lockstep_layout(args, oshared):
    g = flashcomm2_group_ranks(*args, oshared_spans_dp=True)
    assert g.oshared == oshared
    assert g.odp == flashcomm2_group_ranks(*args).odp  # only o_shared changes


@pytest.mark.parametrize("world,tp,dp,pp", [(8, 2, 2, 2), (16, 4, 2, 2), (24, 4, 3, 2),
                                            (16, 8, 2, 1)])
def test_lockstep_oshared_invariants(world, tp, dp, pp):
    """One ODP group of each replica, the same shard, never across PP stages."""
    grid = torch.arange(world).reshape(-1, dp, pp, tp)
    stage_of = {int(r): (int(e), p) for e in range(grid.shape[0]) for d in range(dp)
                for p in range(pp) for r in grid[e, d, p]}
    replica_of = {int(r): (int(e), d) for e in range(grid.shape[0]) for d in range(dp)
                  for p in range(pp) for r in grid[e, d, p]}
    for k in [d for d in range(1, tp) if tp % d == 0]:
        g = flashcomm2_group_ranks(world, tp, dp, pp, k, oshared_spans_dp=True)
        assert sorted(itertools.chain(*g.oshared)) == list(range(world))
        for grp in g.oshared:
            assert len(grp) == dp * (tp // k)
            assert len({stage_of[r] for r in grp}) == 1
            assert len({replica_of[r] for r in grp}) == dp
            members = [d for d in g.odp if set(d) <= set(grp)]
            assert sum(map(len, members)) == len(grp)  # a union of whole ODP groups
            shard = {next(o for o in g.otp if r in o).index(r) for r in grp}
            assert len(shard) == 1  # every member holds the same o_proj shard


def _vllm_reference_tp_groups(world, tp, dp, pp, pcp):
    """TP groups exactly as vLLM 0.32's initialize_model_parallel builds them."""
    all_ranks = torch.arange(world).reshape(-1, dp, pp, pcp, tp)
    return [x.tolist() for x in all_ranks.view(-1, tp).unbind(0)]


@pytest.mark.parametrize(
    "world,tp,dp,pp,pcp",
    [(8, 2, 2, 2, 1), (16, 4, 2, 2, 1), (16, 2, 1, 2, 2), (8, 4, 1, 1, 1),
     (12, 2, 3, 2, 1), (16, 8, 1, 1, 1)],
)
def test_tp_groups_mirror_vllm(world, tp, dp, pp, pcp):
    assert vllm_tp_group_ranks(world, tp, dp, pp, pcp) == _vllm_reference_tp_groups(
        world, tp, dp, pp, pcp
    )


@pytest.mark.parametrize("world,tp,dp,pp", [(8, 8, 1, 1), (16, 8, 2, 1), (16, 4, 2, 2),
                                            (24, 6, 2, 2), (32, 16, 1, 2)])
def test_layout_invariants(world, tp, dp, pp):
    """For every divisor k < tp: partitions, intersections, and the TP-rank identity."""
    for k in [d for d in range(1, tp) if tp % d == 0]:
        g = flashcomm2_group_ranks(world, tp, dp, pp, k)
        D = tp // k
        for kind in (g.otp, g.odp, g.oshared):
            assert sorted(itertools.chain(*kind)) == list(range(world))
        assert all(len(x) == k for x in g.otp) and all(len(x) == D for x in g.odp)
        tp_of = {r: t for t in g.tp for r in t}
        for grp in g.otp + g.odp:  # never leaves a TP group (= DP replica, PP stage)
            assert all(tp_of[r] is tp_of[grp[0]] for r in grp)
        for o in g.otp:
            for d in g.odp:
                assert len(set(o) & set(d)) <= 1
        # TP rank r == OTP rank * D + ODP rank
        for t in g.tp:
            for r in t:
                j = next(o for o in g.otp if r in o).index(r)
                i = next(d for d in g.odp if r in d).index(r)
                assert t.index(r) == j * D + i


def test_split_tp_group_uses_given_ranks():
    otp, odp = split_tp_group([10, 11, 12, 13, 14, 15], 3)
    assert otp == [[10, 12, 14], [11, 13, 15]]
    assert odp == [[10, 11], [12, 13], [14, 15]]


@pytest.mark.parametrize(
    "args,match",
    [((6, 4, 1, 1, 1), r"world_size=6 is not a multiple of dp\*pp\*pcp\*tp=1\*1\*1\*4=4"),
     ((8, 4, 1, 1, 3), "must be a positive divisor of the TP size 4, got 3"),
     ((8, 4, 1, 1, 0), "must be a positive divisor of the TP size 4, got 0"),
     ((8, 0, 1, 1, 1), "tp must be a positive integer, got 0")],
)
def test_layout_errors(args, match):
    with pytest.raises(FlashComm2GroupError, match=match):
        flashcomm2_group_ranks(*args)


def test_accessors_without_groups():
    destroy_flashcomm2_groups()  # absent: a no-op
    assert not flashcomm2_groups_initialized()
    for fn, what in ((get_flashcomm2_otp_group, "OTP"), (get_flashcomm2_odp_group, "ODP"),
                     (get_flashcomm2_oshared_group, "o_shared")):
        with pytest.raises(FlashComm2GroupError, match=f"FlashComm2 {what}.*not initialised"):
            fn()


def test_init_needs_vllm_model_parallel():
    init_flashcomm2_groups(FlashComm2Config(0, False, 1))  # off: nothing to do
    assert not flashcomm2_groups_initialized()
    with pytest.raises(FlashComm2GroupError, match="initialize_model_parallel"):
        init_flashcomm2_groups(FlashComm2Config(2, False, 1))
