"""FlashComm2's collectives on real gloo worlds: the pairwise all-to-all and
vLLM CPU's shared-memory all-gather.

One 4-rank world (vLLM TP4; its TP group has vLLM CPU's shared-memory
communicator, as a vLLM CPU worker's on one node has):

* the all-to-all custom op runs on a 4-rank group and on two 2-rank groups
  (named like our ODP groups: no shared memory), for several row counts and for
  fp32 / bf16 / int8, and compares it bit for bit with
  ``dist.all_to_all_single`` on the same input.  ``torch.distributed.isend``
  and ``irecv`` are wrapped (calling through) to count what each rank sends to
  and receives from each peer, to see that every send and receive is posted
  before the first wait (both directions in flight together), and that the
  output is NaN-poisoned when the receives are posted.
* the all-gather runs through the TP group's shared memory for fp32 and
  bf16, and through gloo for int8 and for a group without it.

No timings: ``benchmarks/bench_collectives.py`` measures them.
"""

from __future__ import annotations

import pytest
import torch

from cpu_features import cpu_has_avx512
from tests.dist_utils import run_distributed
from vllm_ascend_ext.distributed.communication import all_to_all_is_pairwise

# Its 4-rank world takes vLLM CPU's spin-waiting shared-memory communicator
# (AVX-512 builds): in CI's engine lane, never beside an engine.
pytestmark = pytest.mark.engine_lane

DTYPES = (torch.float32, torch.bfloat16, torch.int8)
ROWS_PER_RANK = (0, 1, 3, 8)
WIDTH = (5, 2)  # trailing dims: the op splits dim 0 only


def test_pairwise_only_on_gloo():
    assert all_to_all_is_pairwise("gloo")
    for backend in ("nccl", "hccl", "mpi", "ucc"):
        assert not all_to_all_is_pairwise(backend)


class _P2PRecorder:
    """Wraps ``torch.distributed.isend`` / ``irecv`` for the duration of a
    ``with``: every post and every wait goes into ``events``, in order."""

    def __init__(self):
        self.events: list[tuple] = []

    def __enter__(self):
        import torch.distributed as dist

        self._dist = dist
        self._real = (dist.isend, dist.irecv)
        events = self.events

        class _Work:
            def __init__(self, work, kind, peer):
                self._work, self._kind, self._peer = work, kind, peer

            def wait(self, *a, **kw):
                events.append(("wait", self._kind, self._peer))
                return self._work.wait(*a, **kw)

        def isend(tensor, dst=None, group=None, tag=0, **kw):
            events.append(("isend", dst, tensor.nbytes, None))
            return _Work(self._real[0](tensor, dst=dst, group=group, tag=tag, **kw),
                         "isend", dst)

        def irecv(tensor, src=None, group=None, tag=0, **kw):
            all_nan = bool(tensor.is_floating_point() and tensor.numel()
                           and torch.isnan(tensor).all())
            events.append(("irecv", src, tensor.nbytes, all_nan))
            return _Work(self._real[1](tensor, src=src, group=group, tag=tag, **kw),
                         "irecv", src)

        dist.isend, dist.irecv = isend, irecv
        return self

    def __exit__(self, *exc):
        self._dist.isend, self._dist.irecv = self._real


def _input(rank, P, rows_per_rank, dtype):
    """Rows of chunk i of rank r hold r * 1000 + i * 100 + row (int8: mod 128),
    so any misrouted chunk is visible."""
    n = rows_per_rank * P
    row = torch.arange(n) % max(rows_per_rank, 1)
    dest = torch.arange(n) // max(rows_per_rank, 1)
    base = rank * 1000 + dest * 100 + row
    if dtype == torch.int8:
        base = (rank * 37 + dest * 11 + row) % 128
    x = base.view(n, 1, 1).expand(n, *WIDTH).to(torch.float64)
    x = x + torch.arange(WIDTH[0] * WIDTH[1]).view(1, *WIDTH) * (dtype != torch.int8)
    return x.to(dtype)


def _world_worker(rank, world_size):
    return dict(all_to_all=_all_to_all_cases(rank), all_gather=_all_gather_cases(rank))


def _all_to_all_cases(rank):
    import torch.distributed as dist

    from tests.dist_utils import make_group_coordinator
    from vllm_ascend_ext.distributed.communication import (
        all_to_all_dim0,
        set_poison_outputs,
    )

    groups = {
        4: make_group_coordinator([[0, 1, 2, 3]], "fc2c_test_a2a4"),
        2: make_group_coordinator([[0, 2], [1, 3]], "fc2c_test_a2a2"),
    }
    set_poison_outputs(True)
    report = []
    try:
        for P, group in groups.items():
            assert dist.get_backend(group.device_group) == "gloo"
            me = group.rank_in_group
            for dtype in DTYPES:
                for rows in ROWS_PER_RANK:
                    x = _input(me, P, rows, dtype)
                    expected = torch.empty_like(x)
                    dist.all_to_all_single(expected, x, group=group.device_group)
                    with _P2PRecorder() as rec:
                        got = all_to_all_dim0(x, group)
                    chunk_bytes = x.nbytes // P
                    posts = [e for e in rec.events if e[0] != "wait"]
                    waits = [i for i, e in enumerate(rec.events) if e[0] == "wait"]
                    report.append(dict(
                        P=P, dtype=str(dtype), rows=rows, me=me, ranks=group.ranks,
                        equal=torch.equal(got, expected),
                        # rank order: chunk j came from group rank j
                        own_chunk_equal=torch.equal(
                            got.view(P, rows, *WIDTH)[me], x.view(P, rows, *WIDTH)[me]),
                        sent={e[1]: e[2] for e in posts if e[0] == "isend"},
                        received={e[1]: e[2] for e in posts if e[0] == "irecv"},
                        n_isend=sum(e[0] == "isend" for e in posts),
                        n_irecv=sum(e[0] == "irecv" for e in posts),
                        recv_poisoned=[e[3] for e in posts if e[0] == "irecv"],
                        posts_before_waits=(not waits) or waits[0] == len(posts),
                        chunk_bytes=chunk_bytes,
                        a2a_single_bytes_per_direction=(P - 1) * chunk_bytes,
                    ))
    finally:
        set_poison_outputs(False)
        for g in groups.values():
            g.destroy()
    return report


@pytest.fixture(scope="module")
def world():
    return run_distributed(_world_worker, 4, cpu_shm=True, timeout=400)


@pytest.fixture(scope="module")
def all_to_all_report(world):
    return [rank["all_to_all"] for rank in world]


def test_pairwise_all_to_all_equals_all_to_all_single(all_to_all_report):
    cases = [c for rank in all_to_all_report for c in rank]
    assert len(cases) == 4 * 2 * len(DTYPES) * len(ROWS_PER_RANK)
    bad = [c for c in cases if not (c["equal"] and c["own_chunk_equal"])]
    assert not bad, bad[:3]


def test_pairwise_all_to_all_bytes_per_direction(all_to_all_report):
    for rank, cases in enumerate(all_to_all_report):
        for c in cases:
            peers = {r for r in c["ranks"] if r != rank}
            if c["rows"] == 0:
                assert c["n_isend"] == c["n_irecv"] == 0, c
                continue
            # one chunk to and one from every peer, none to itself: exactly
            # the (P-1)/P of the input all_to_all_single moves each way
            assert c["n_isend"] == c["n_irecv"] == c["P"] - 1, c
            assert c["sent"] == {p: c["chunk_bytes"] for p in peers}, c
            assert c["received"] == {p: c["chunk_bytes"] for p in peers}, c
            assert sum(c["sent"].values()) == c["a2a_single_bytes_per_direction"]
            assert c["posts_before_waits"], c


def test_pairwise_all_to_all_output_is_poisoned(all_to_all_report):
    floats = [c for rank in all_to_all_report for c in rank
              if c["dtype"] != "torch.int8" and c["rows"] > 0]
    assert floats
    assert all(all(c["recv_poisoned"]) and c["recv_poisoned"] for c in floats)


def _all_gather_cases(rank):
    import torch.distributed as dist
    from vllm.distributed import parallel_state as ps

    from tests.dist_utils import make_group_coordinator
    from vllm_ascend_ext.compat import cpu_shm_collectives
    from vllm_ascend_ext.distributed.communication import (
        all_gather_dim0,
        set_poison_outputs,
    )

    tp = ps.get_tp_group()
    other = make_group_coordinator([[0, 1, 2, 3]], "fc2c_test_ag")
    shm = cpu_shm_collectives(tp)
    out = dict(tp_has_shm=shm is not None, other_has_shm=cpu_shm_collectives(other) is not None)
    calls = []
    if shm is not None:
        real = shm.all_gather_into_tensor

        def spy(output, input, group=None):
            calls.append(str(input.dtype))
            return real(output, input, group=group)

        shm.all_gather_into_tensor = spy
    set_poison_outputs(True)
    try:
        for group_tag, group in (("tp", tp), ("other", other)):
            for dtype in DTYPES:
                x = _input(rank, 1, 6, dtype)
                expected = torch.empty(6 * 4, *WIDTH, dtype=dtype)
                dist.all_gather_into_tensor(expected, x, group=group.device_group)
                n = len(calls)
                got = all_gather_dim0(x, group)
                out[f"{group_tag} {dtype}"] = (torch.equal(got, expected), len(calls) - n)
    finally:
        set_poison_outputs(False)
        if shm is not None:
            shm.all_gather_into_tensor = real
        other.destroy()
    return out


def test_all_gather_takes_vllm_cpu_shared_memory(world):
    if not cpu_has_avx512() and not any(r["all_gather"]["tp_has_shm"] for r in world):
        pytest.skip("needs vLLM CPU's shared-memory communicator, which only its AVX-512 "
                    "kernels have; this CPU has no avx512f (the TP group runs on gloo)")
    for rank_out in (rank["all_gather"] for rank in world):
        assert rank_out["tp_has_shm"] and not rank_out["other_has_shm"], rank_out
        # fp32 / bf16 through shared memory, int8 (no kernel) and the group
        # without it through gloo: the same result either way
        assert rank_out["tp torch.float32"] == (True, 1), rank_out
        assert rank_out["tp torch.bfloat16"] == (True, 1), rank_out
        assert rank_out["tp torch.int8"] == (True, 0), rank_out
        for dtype in DTYPES:
            assert rank_out[f"other {dtype}"] == (True, 0), rank_out


def test_cpu_shm_collectives_needs_vllms_class():
    # The accessor reads vLLM's private class; keep it visible when it moves.
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    from vllm_ascend_ext.compat import cpu_shm_collectives

    assert hasattr(_CPUSHMDistributed, "all_gather_into_tensor")
    assert cpu_shm_collectives(object()) is None
