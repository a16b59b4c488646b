"""The two gloo worlds of the vllm-ascend leg, each started once per session
(conftest.py): a worker importing vllm-ascend is the expensive part, so one
world runs every check of its size and returns a dict of results per rank.

A check that raises is recorded as ``{"error": traceback}`` and the next one
runs (every check raises on every rank alike, so no rank is left waiting in a
collective); :func:`result` turns it into that test's failure.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable


def _run(results: dict, name: str, fn: Callable, *args: Any) -> None:
    # on the worker's stderr, so a world that hangs shows where
    print(f"[ascend leg, rank {os.environ.get('RANK')}] {name}", file=sys.stderr, flush=True)
    try:
        results[name] = fn(*args)
    except Exception:  # noqa: BLE001 - reported to the test that reads it
        results[name] = {"error": traceback.format_exc()}


def result(world: list[dict], name: str) -> list[Any]:
    """Per-rank results of check ``name``; a failed check fails the caller."""
    out = []
    for rank, r in enumerate(world):
        got = r[name]
        if isinstance(got, dict) and "error" in got:
            raise AssertionError(f"check {name!r} raised on rank {rank}:\n{got['error']}")
        out.append(got)
    return out


def two_ranks(rank: int, world_size: int, configs: dict) -> dict:
    from vllm.config import set_current_vllm_config

    from tests.ascend_real import model_checks as mc
    from tests.ascend_real.worker_setup import prepare_worker

    results: dict = {}
    for arch in ("deepseek", "qwen"):
        cfg = configs[arch]
        with set_current_vllm_config(cfg):
            prepare_worker(cfg)

        def build_and_describe(cfg=cfg):
            ours = mc.build_model(mc.fresh(cfg))
            plain = mc.build_model(mc.fresh(cfg), ours=False)
            out = {"ours": mc.describe(ours), "plain": mc.describe(plain),
                   "series": [l.prefix for l in ours.flashcomm2.series.layers]}
            mc.close(ours)
            return out

        _run(results, f"build {arch}", build_and_describe)
    with set_current_vllm_config(configs["deepseek"]):
        prepare_worker(configs["deepseek"])
        _run(results, "stale holders", mc.stale_holder_errors, configs["deepseek"])
        _run(results, "mla forward", mc.mla_forward_through_real_impl, rank,
             configs["deepseek"])
    with set_current_vllm_config(configs["qwen"]):
        prepare_worker(configs["qwen"])
        _linear_checks(results, rank, world_size, ks=(1,))
    return results


def four_ranks(rank: int, world_size: int, configs: dict) -> dict:
    from vllm.config import set_current_vllm_config

    from tests.ascend_real.worker_setup import prepare_worker

    results: dict = {}
    with set_current_vllm_config(configs["qwen_tp4"]):
        prepare_worker(configs["qwen_tp4"])
        _linear_checks(results, rank, world_size, ks=(1, 2))
    return results


def _linear_checks(results: dict, rank: int, P: int, ks: tuple[int, ...]) -> None:
    from tests.ascend_real import linear_checks as lc

    _run(results, "methods and weights", lc.methods_and_weights, rank, P, ks)
    _run(results, "flashcomm2 vs plain tp", lc.flashcomm2_vs_plain_tp, rank, P, ks)
    _run(results, "adaptive small side", lc.adaptive_small_side, rank, P, ks)
    for k in ks:
        _run(results, f"o_shared k={k}", lc.oshared_over_real_w8a8, rank, P, k)
        _run(results, f"tp-shard o_shared k={k}", lc.tp_shard_over_real_methods, rank, P, k)
