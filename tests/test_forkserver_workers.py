"""The engine driver's workers, forked from a server that imported vLLM once,
start as spawned ones would: with the environment and the standard output and
error their parent had at ``start()``, not the server's.

The engine-level proof (forked workers compute what spawned ones do, bit for
bit, and log to their own engine's log) is ``tests/e2e/test_engine_driver.py``.
"""

from __future__ import annotations

import json
import multiprocessing.forkserver
import os
from multiprocessing.context import ForkServerContext

import pytest

from tests.e2e.forkserver_workers import CONTEXT

pytestmark = pytest.mark.vllm_independent  # Python's multiprocessing only

FLAG = "VLLM_ASCEND_EXT_TEST_FORKED_FLAG"


def _report(path: str) -> None:
    print(f"worker {os.getpid()} says hello", flush=True)
    with open(path, "w") as fh:
        json.dump({"flag": os.environ.get(FLAG)}, fh)


def _start_and_join(context, tmp_path, name: str) -> tuple[dict, str]:
    """Start one process with fd 1 pointing at a log of its own, as the
    driver does around each engine; return its report and that log."""
    log_path, report = tmp_path / f"{name}.log", tmp_path / f"{name}.json"
    saved = os.dup(1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(log_fd, 1)
        proc = context.Process(target=_report, args=(str(report),))
        proc.start()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(log_fd)
    proc.join(60)
    assert proc.exitcode == 0, f"{name}: exit code {proc.exitcode}"
    return json.loads(report.read_text()), log_path.read_text()


@pytest.fixture
def server_started_without_the_flag(monkeypatch):
    """The server runs (started here if no test started it) while the flag is
    unset, as the driver starts it before any engine sets its flags."""
    monkeypatch.delenv(FLAG, raising=False)
    multiprocessing.forkserver.ensure_running()
    yield
    # CPython's own tests stop it this way; no process is left behind.
    multiprocessing.forkserver._forkserver._stop()


@pytest.mark.usefixtures("server_started_without_the_flag")
def test_a_forked_worker_runs_with_its_parents_environment_and_output_at_start(
        tmp_path, monkeypatch):
    for name, value in (("engine-1", "on"), ("engine-2", "off")):
        monkeypatch.setenv(FLAG, value)
        report, log = _start_and_join(CONTEXT, tmp_path, name)
        assert report["flag"] == value, name
        assert "says hello" in log, f"{name}'s output did not reach its log: {log!r}"
    monkeypatch.delenv(FLAG)
    report, _ = _start_and_join(CONTEXT, tmp_path, "engine-3")
    assert report["flag"] is None  # nothing left over from the engines before


@pytest.mark.usefixtures("server_started_without_the_flag")
def test_a_plain_forkserver_worker_would_miss_both(tmp_path, monkeypatch):
    """Why the driver's context exists: a plain forkserver child has the
    server's environment and output."""
    monkeypatch.setenv(FLAG, "on")
    report, log = _start_and_join(ForkServerContext(), tmp_path, "plain")
    assert report["flag"] is None
    assert "says hello" not in log
