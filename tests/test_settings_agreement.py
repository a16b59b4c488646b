"""Every rank agrees on the FlashComm2 settings before any FlashComm2
collective, or every rank stops with the same clear error (real gloo worlds,
the real torch.distributed store)."""

from __future__ import annotations

import time

import pytest

from tests.dist_utils import run_distributed
from vllm_ascend_ext.config import FlashComm2ConfigError, parse_flashcomm2_config
from vllm_ascend_ext.distributed.settings_agreement import (
    RankSettings,
    compare_rank_settings,
)


def _agree_with_env(rank, world_size, cases, timeout_s):
    """Each rank parses its own env and additional_config (as each host does)
    and agrees, once per case, in the same order on every rank."""
    from vllm_ascend_ext.distributed.settings_agreement import agree_on_settings

    results = []
    for envs, additional in cases:
        try:
            cfg, err = parse_flashcomm2_config(envs[rank], additional[rank]), None
        except FlashComm2ConfigError as e:
            cfg, err = None, str(e)
        try:
            agree_on_settings(cfg, err, timeout_s=timeout_s)
            results.append(("ok",))
        except FlashComm2ConfigError as e:
            results.append(("error", str(e)))
    return results


def _publish_nothing_on_rank(rank, world_size, skip_rank, timeout_s):
    """Rank ``skip_rank`` never publishes (a host without the plugin) but
    stays up until the others have given up, as such a host would."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import _get_default_store

    from vllm_ascend_ext.distributed.settings_agreement import agree_on_settings

    store = _get_default_store()
    if rank == skip_rank:
        store.wait(["test/others-done"], timedelta(seconds=240))
        return ("skipped",)
    t0 = time.monotonic()
    try:
        agree_on_settings(parse_flashcomm2_config({}, {}), timeout_s=timeout_s)
        result = ("ok",)
    except FlashComm2ConfigError as e:
        result = ("error", str(e), time.monotonic() - t0)
    store.set("test/others-done", "1")
    return result


ON = {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1", "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1"}
AC_ON = {"enable_flashcomm2_parallel_size": 1, "layer_sharding": ["o_proj"]}
BAD = {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "two"}

# (name, (env per rank, additional_config per rank)); one gloo world runs them all.
CASES = {
    "equal": ((ON, ON), ({}, {})),
    "same values, other sources": ((ON, {}), ({}, AC_ON)),
    "flags on the head only": ((ON, {}), ({}, {})),
    "flags on the worker only": (({}, ON), ({}, {})),
    "additional_config on the head only": (({}, {}), (AC_ON, {})),
    "prefetch step": ((ON, {**ON, "VLLM_ASCEND_FLASHCOMM2_OSHARED_PREFETCH_STEP": "2"}),
                      ({}, {})),
    "adaptive threshold": ((ON, {**ON, "VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS": "8"}),
                           ({}, {})),
    "int8 all-to-all": ((ON, {**ON, "VLLM_ASCEND_FLASHCOMM2_INT8_ALL_TO_ALL": "0"}), ({}, {})),
    "unparsable flag": ((ON, BAD), ({}, {})),
}
DIFFERING = {
    "flags on the head only": "parallel_size",
    "flags on the worker only": "parallel_size",
    "additional_config on the head only": "parallel_size",
    "prefetch step": "prefetch_step",
    "adaptive threshold": "adaptive_tokens",
    "int8 all-to-all": "int8_all_to_all",
}


@pytest.fixture(scope="module")
def verdicts():
    names = list(CASES)
    # A kept world serves: each exchange publishes under keys of its own
    # number, counted alike on every rank (every rank agrees once per case).
    # 120 s: only a bound (every rank publishes in every case); `make test`
    # runs this lane at a lower priority beside the engines.
    per_rank = run_distributed(_agree_with_env, 2, [CASES[n] for n in names], 120.0,
                               init_vllm=False, timeout=600)
    return {n: (per_rank[0][i], per_rank[1][i]) for i, n in enumerate(names)}


@pytest.mark.parametrize("case", ["equal", "same values, other sources"])
def test_equal_values_agree(case, verdicts):
    assert verdicts[case] == (("ok",), ("ok",))


@pytest.mark.parametrize("case", list(DIFFERING))
def test_a_difference_stops_every_rank_naming_both_values(case, verdicts):
    setting = DIFFERING[case]
    head, worker = verdicts[case]
    assert head[0] == worker[0] == "error", verdicts[case]
    assert head[1] == worker[1], "both ranks must report the same verdict"
    msg = head[1]
    assert f"{setting} (" in msg
    assert "same FLASHCOMM2 environment variables and the same --additional-config" in msg
    # Each rank's value is shown with where it came from.
    envs, additional = CASES[case]
    for rank in (0, 1):
        cfg = parse_flashcomm2_config(envs[rank], additional[rank])
        value = getattr(cfg, setting)
        shown = ("on" if value else "off") if isinstance(value, bool) else repr(value)
        source = cfg.sources[setting].split(" (overrides", 1)[0]
        assert f"rank {rank} on" in msg
        assert f": {shown} [{source}" in msg, (shown, msg)


def test_a_rank_that_cannot_parse_its_flags_is_named_on_every_rank(verdicts):
    for status, msg in verdicts["unparsable flag"]:
        assert status == "error"
        assert "rank 1 on" in msg and "rejected its own FlashComm2 settings" in msg
        assert "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE='two'" in msg


def test_a_rank_that_never_reports_times_out_with_a_bounded_wait():
    # Fresh: rank 1 never agrees, so the ranks' exchange numbers part ways.
    out = run_distributed(_publish_nothing_on_rank, 2, 1, 3.0, init_vllm=False, timeout=240,
                          fresh=True)
    assert out[1] == ("skipped",)
    # It raised rather than hung (run_distributed's timeout guards the wait);
    # how long it took is not asserted: a loaded machine stretches it.
    status, msg, _waited = out[0]
    assert status == "error"
    assert "rank(s) [1] of 2 did not report" in msg and "within 3 s" in msg


def test_report_lists_every_rank_with_its_source():
    cfg_on = parse_flashcomm2_config(ON, {})
    cfg_off = parse_flashcomm2_config({}, {})
    a = RankSettings.of(0, cfg_on)
    b = RankSettings.of(1, cfg_off)
    report = compare_rank_settings([a, b])
    assert "parallel_size" in report and "oshared" in report
    assert "1 [VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE]" in report
    assert "0 [default]" in report
    assert compare_rank_settings([a, RankSettings.of(1, cfg_on)]) is None
    c = RankSettings(**{**RankSettings.of(1, cfg_on).__dict__, "plugin_version": "0.0.9"})
    assert "versions differ" in compare_rank_settings([a, c])
