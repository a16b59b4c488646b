"""`vllm serve --data-parallel-size 2 --tensor-parallel-size 2` with o_shared,
under uneven load.

vLLM 0.32 runs DP replicas in two ways, and o_shared follows it:

* MoE (DeepSeek-V3 here): the replicas step in lockstep, an idle replica
  running 1-token dummy batches, because the experts' all-gather spans DP.
  The o_shared group spans both replicas (4 ranks), so a request served by
  one replica only completes if the idle one keeps broadcasting its share of
  the o_proj weights: an answer is the proof that the lockstep holds.
  Needs patch 0003 (CPU ``all_gatherv``), which the experts' all-gather runs
  through with the flags on or off: the o_shared server answering with DP=1's
  outputs proves that the patch serves MoE at DP=2 (one server, not a second
  flags-off one).
* Dense (Qwen3): each replica is an independent engine, and the o_shared group
  stays inside it. Every request pinned to one replica leaves the other with
  no steps at all, which would hang a group spanning them.

Requests are pinned with vLLM's ``X-data-parallel-rank`` header: first every
prompt to replica 0 (replica 1 idle), then to replica 1, then a concurrent
burst to replica 0. Each answer is compared with the offline plain-TP2 engine
(DP=1) on the same checkpoint, with the accuracy criteria of the other e2e
tests (prompt logprobs within 2e-4 nats, greedy tokens by vLLM's rule).
"""

from __future__ import annotations

import concurrent.futures as cf
import re
from dataclasses import dataclass

import pytest

from tests.e2e.harness import (
    assert_greedy_close,
    assert_prompt_logprobs_close,
    flashcomm2_flags,
    make_prompts,
    served_completion,
)
from vllm_ascend_ext.tools.local_server import VllmServer, process_group_alive

MOE_ARCH = "DeepseekV3ForCausalLM"
DENSE_ARCH = "Qwen3ForCausalLM"
OSHARED = flashcomm2_flags(1, oshared=True)
# MoE with the threshold at 0 (a prefill-only instance): the one case where
# o_shared keeps round-robin storage, because its group spans both replicas
# and holds 1/4 of each o_proj where TP shards would hold 1/2. Every step runs
# FlashComm2, the idle replica's 1-token dummy batches included, so every
# step broadcasts across the replicas in lockstep. (The adaptive switch's
# DP-wide side choice is checked on gloo: tests/test_resident_slice.py.)
MOE_OSHARED = flashcomm2_flags(1, oshared=True, adaptive=0)
BURST = 8


@dataclass
class DPServeRun:
    by_replica: dict[int, list[dict]]  # replica -> outputs in the harness layout
    burst: list[dict]
    log: str


def _serve_uneven(model: str, env: dict) -> DPServeRun:
    prompts = make_prompts(model)
    server = VllmServer(model=model, tp=2, dp=2, env=env)
    with server:
        by_replica = {rep: [served_completion(server, ids, replica=rep) for ids in prompts]
                      for rep in (0, 1)}
        with cf.ThreadPoolExecutor(max_workers=BURST) as pool:
            burst = list(pool.map(
                lambda i: served_completion(server, prompts[i % len(prompts)], replica=0),
                range(BURST)))
        log = server.log_text()
    assert not process_group_alive(server.pgid), "vllm serve left processes behind"
    return DPServeRun(by_replica, burst, log)


@pytest.fixture(scope="module")
def dp_runs(tiny_model):
    cache: dict = {}

    def get(arch: str, env: dict) -> DPServeRun:
        key = (arch, tuple(sorted(env.items())))
        if key not in cache:
            cache[key] = _serve_uneven(str(tiny_model(arch)), env)
        return cache[key]

    return get


def _layers_held(log: str, ranks: int) -> list[tuple[int, int]]:
    """(owned layers, ring slots) of every worker's o_shared series report."""
    return sorted((int(o), int(r)) for o, r in re.findall(
        rf"layers \(0\.\.4\) over {ranks} ranks.*?\((\d+) owned \+ (\d+) slots\)", log))


def _tp_shard_held(log: str) -> list[tuple[int, int]]:
    """(layers, ring slots) of every worker's TP-shard storage report."""
    return sorted((int(n), int(s)) for n, s in re.findall(
        r"TP-shard storage, (\d+) layers \(0\.\.4\).*?\+ (\d+) ring slot", log))


def _check_against(ref: list[dict], run: DPServeRun, label: str) -> float:
    worst = 0.0
    for rep, outs in run.by_replica.items():
        name = f"{label} replica {rep}"
        worst = max(worst, assert_prompt_logprobs_close(ref, outs, names=("reference", name)))
        assert_greedy_close(ref, outs, names=("reference", name))
    n = len(ref)
    assert_greedy_close([ref[i % n] for i in range(BURST)], run.burst,
                        names=("reference", f"{label} burst"))
    return worst


def test_moe_dp2_oshared_spans_replicas_and_matches_dp1(engines, dp_runs):
    """Patch 0003 serves MoE at DP=2, and o_shared's group spans both replicas:
    every answer, from either replica and from the burst, is DP=1 plain TP2's."""
    run = dp_runs(MOE_ARCH, MOE_OSHARED)
    # One o_shared group of 4 ranks across both replicas, reported by each rank,
    # stored round-robin (auto: the group spans DP and the threshold is 0).
    assert run.log.count("o_shared [0, 1, 2, 3] (spans 2 DP replicas in lockstep)") == 4
    assert run.log.count("o_shared storage: round_robin (the o_shared group (4 ranks) "
                         "spans DP replicas") == 4
    # Memory: 5 hidden layers over 4 ranks -> rank 0 owns 2 (layers 0 and 4),
    # the others 1; each receives into one ring slot. Replicated would be 5.
    held = _layers_held(run.log, 4)
    assert held == [(1, 1), (1, 1), (1, 1), (2, 1)], held
    worst = _check_against(engines.run(MOE_ARCH, tp=2).outputs, run, "DP2xTP2 o_shared")
    print(f"\n{MOE_ARCH} DP2xTP2 o_shared vs DP1 TP2: max prompt-logprob gap {worst:.2e}")


def test_dense_dp2_oshared_stays_in_replica_without_hang(engines, dp_runs):
    run = dp_runs(DENSE_ARCH, OSHARED)
    # Each replica is its own 2-rank world with its own o_shared group.
    assert "spans 2 DP replicas" not in run.log
    assert run.log.count("o_shared [0, 1]") == 4
    # TP shards inside each replica: every worker holds plain TP's 5 layers + 1 slot.
    assert _tp_shard_held(run.log) == [(5, 1)] * 4, _tp_shard_held(run.log)
    worst = _check_against(engines.run(DENSE_ARCH, tp=2).outputs, run, "DP2xTP2 o_shared")
    print(f"\n{DENSE_ARCH} DP2xTP2 o_shared vs DP1 TP2: max prompt-logprob gap {worst:.2e}")
