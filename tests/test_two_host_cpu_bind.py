"""Each emulated host's ranks get cores of their own, as on real hosts
(pure: no namespaces are made)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vllm_ascend_ext.tools.multinode.serve import TwoHostServer, host_cpu_bind

# Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
pytestmark = pytest.mark.vllm_independent


def _cores(bind: str) -> set[int]:
    out = set()
    for span in bind.replace("|", ",").split(","):
        lo, _, hi = span.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@pytest.mark.parametrize("ncpu, ranks", [(2, 1), (4, 1), (4, 2), (8, 2), (16, 4), (5, 2)])
def test_the_two_hosts_never_share_a_core(ncpu, ranks):
    head, worker = (host_cpu_bind(n, ranks, ncpu) for n in (0, 1))
    assert head.count("|") == worker.count("|") == ranks - 1  # one span per rank
    assert not _cores(head) & _cores(worker)
    assert _cores(head) | _cores(worker) <= set(range(ncpu))
    for bind in (head, worker):  # the ranks of one host do not share either
        spans = [_cores(s) for s in bind.split("|")]
        assert sum(map(len, spans)) == len(set().union(*spans))


def test_fewer_cores_than_ranks_keeps_the_machine_wide_binding():
    assert host_cpu_bind(0, 2, 2) is None  # DP layout: 4 ranks on 2 cores


@dataclass
class _Host:  # the collaborator TwoHostServer reads: a host's own env
    address: str

    def env(self):
        return {"VLLM_HOST_IP": self.address}


@dataclass
class _Hosts:
    hosts: tuple


def test_server_environment_binds_each_host_to_its_own_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    server = TwoHostServer(_Hosts((_Host("10.0.0.1"), _Host("10.0.0.2"))), "model", tp=2)
    binds = [server.environment(n)["VLLM_CPU_OMP_THREADS_BIND"] for n in (0, 1)]
    assert binds == ["0", "1"]  # was "0-1" on both: two workers on both cores
    dp = TwoHostServer(_Hosts((_Host("a"), _Host("b"))), "model", tp=2, layout="dp")
    assert dp.environment(1)["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
