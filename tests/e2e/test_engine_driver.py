"""An engine driver runs many engines in one process: nothing of one engine
may reach the next.

The driver imports vLLM once; each engine gets fresh workers started with its
own environment. The proof is one driver running FlashComm2 + o_shared, then
flags off, then the flags again: the "off" run equals plain TP in a fresh
process bit for bit, the two "on" runs equal each other bit for bit, and each
run's own log (the driver splits them) states that run's effective settings.
"""

from __future__ import annotations

from tests.e2e.harness import (
    COUNT_SIDES_RPC,
    DRIVERS,
    MEMORY_RPC,
    DriverPool,
    engine_env,
    flashcomm2_flags,
    make_prompts,
    run_vllm,
)
from tests.suite_hygiene import COUNTS, StartCounts

ARCH = "Qwen3ForCausalLM"
ON = flashcomm2_flags(1, True, 1)
# The engine cache's RPCs: these runs serve its other tests (engines.remember).
RPCS = {"rpc_before_generate": [COUNT_SIDES_RPC], "collective_rpc": [MEMORY_RPC]}


def _classes(result) -> set[str]:
    return {c for worker in result.rpc[MEMORY_RPC] for c in worker["o_proj_classes"]}


def _settings_lines(result) -> list[str]:
    return [line for line in result.log.splitlines()
            if "FlashComm2 on:" in line or "FlashComm2 off:" in line]


def test_flags_on_off_on_in_one_driver_leak_nothing(tiny_model, engines):
    model = tiny_model(ARCH)
    prompts = make_prompts(model)
    # The driver may have run other tests' engines before: a longer history
    # only makes the proof stronger.
    runs = [run_vllm(model, prompts, tp=2, env=ON, **RPCS)]
    driver_pid, drivers_started = DRIVERS.driver.proc.pid, COUNTS.engine_drivers
    runs += [run_vllm(model, prompts, tp=2, env=env, **RPCS)
             for env in (None, ON)]
    assert (DRIVERS.driver.proc.pid, COUNTS.engine_drivers) == (driver_pid, drivers_started), (
        "the three engines did not share a driver")
    fresh = run_vllm(model, prompts, tp=2, **RPCS, fresh_process=True)
    assert DRIVERS.driver.proc.pid == driver_pid
    on1, off, on2 = runs

    assert _classes(on1) == _classes(on2) == {"FlashComm2RowParallelLinear"}
    assert _classes(off) == _classes(fresh) == {"RowParallelLinear"}
    # Bit for bit: every logprob float and every token.
    assert off.outputs == fresh.outputs
    assert on1.outputs == on2.outputs
    assert off.rpc == fresh.rpc

    # Each log holds its own run's settings line (its workers log it) and no other.
    for run, state in ((on1, "on"), (off, "off"), (on2, "on")):
        lines = _settings_lines(run)
        assert lines and all(f"FlashComm2 {state}:" in line for line in lines), lines
    assert all("o_proj TP size=1 [VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE]" in line
               for line in _settings_lines(on2))
    assert all("o_proj TP size=0 [default]" in line for line in _settings_lines(off))

    # The other tests need these two configurations: they are not run again.
    engines.remember(ARCH, on1, tp=2, env=ON)
    engines.remember(ARCH, off, tp=2)


def test_one_driver_serves_every_test_and_every_flag_setting(monkeypatch):
    """Only what an engine reads at vLLM's import keys a driver: the test's
    name (pytest sets it per test) and the FlashComm2 flags do not, a
    test-only plugin on PYTHONPATH does."""
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/a.py::test_a (call)")
    first = DriverPool._key(engine_env(2))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/b.py::test_b (call)")
    assert DriverPool._key(engine_env(2)) == first
    assert DriverPool._key(engine_env(2, ON)) == first
    assert DriverPool._key(engine_env(1)) == first  # the CPU binding is per engine
    assert DriverPool._key(engine_env(2, pretend_amx=True)) != first
    # Nor does what this process's environment gains later (importing vLLM
    # here adds TORCHINDUCTOR_* and others).
    monkeypatch.setenv("VLLM_ASCEND_EXT_TEST_SET_AFTER_IMPORT", "1")
    assert DriverPool._key(engine_env(2)) == first


class _FakeDriver:
    """Stands in for an engine driver process (the pool's collaborator)."""

    started: list[dict] = []

    def __init__(self, env):
        self.env, self.closed = env, False
        _FakeDriver.started.append(env)

    def alive(self) -> bool:
        return not self.closed

    def run(self, spec, timeout):
        if spec.get("interrupt"):
            raise KeyboardInterrupt  # as pytest-timeout's exception arrives mid-select
        return {"ran": spec}, "", None

    def close(self, kill: bool = False) -> None:
        self.closed, self.killed = True, kill


def test_a_driver_interrupted_mid_engine_is_killed_and_never_reused(monkeypatch):
    """A timeout that fires while a driver runs an engine leaves that engine
    running: its late reply would answer the next request. The pool kills
    the driver and starts a fresh one for the next engine."""
    import tests.e2e.harness as harness

    monkeypatch.setattr(harness, "EngineDriver", _FakeDriver)
    monkeypatch.setattr(harness, "COUNTS", StartCounts())
    monkeypatch.setattr(_FakeDriver, "started", [])
    pool = harness.DriverPool()
    env = engine_env(2)
    pool.run({}, env, 1)
    first = pool.driver
    try:
        pool.run({"interrupt": True}, env, 1)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interruption did not reach the caller")
    assert first.closed and first.killed and not pool.drivers
    assert pool.run({}, env, 1)[0] == {"ran": {}}
    assert pool.driver is not first and len(_FakeDriver.started) == 2
    pool.close()


def test_a_driver_per_key_is_kept_and_the_least_recently_used_closed_first(monkeypatch):
    """Going back to a key reuses its driver (the suite alternates between a
    plain driver and a pretend-AMX one); a third key closes the driver least
    recently used, so at most two hold vLLM in memory."""
    import tests.e2e.harness as harness

    monkeypatch.setattr(harness, "EngineDriver", _FakeDriver)
    monkeypatch.setattr(harness, "COUNTS", StartCounts())  # not the suite's starts
    monkeypatch.setattr(_FakeDriver, "started", [])
    pool = harness.DriverPool()
    plain, amx, other = engine_env(2), engine_env(2, pretend_amx=True), {"OTHER": "1"}
    for env in (plain, amx, dict(plain, **ON), amx):
        assert pool.run({}, env, 1)[0] == {"ran": {}}
    assert _FakeDriver.started == [plain, amx]
    plain_driver = pool.drivers[DriverPool._key(plain)]
    pool.run({}, other, 1)
    assert plain_driver.closed and len(pool.drivers) == 2
    assert pool.driver.env == other
    pool.close()
    assert not pool.drivers
