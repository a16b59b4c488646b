"""Shared fixtures: the tiny checkpoints are real files, built once per machine
(cached under ~/.cache/vllm-ascend-ext/tiny-models, keyed by recipe version)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Every process the tests start (engines, workers, `vllm serve`, gloo worlds)
# imports this checkout's plugin, not whatever a reused venv's editable
# install points at (the e2e harness checks what each engine imported).
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


#: The vllm-ascend leg (``make test-ascend``) runs in a pytest process of its
#: own: its bootstrap makes vllm-ascend's NPUPlatform the current platform and
#: stands in for torch_npu for the whole process (tests/ascend_real/bootstrap.py).
ASCEND_LEG = "ascend_real"


def pytest_addoption(parser):
    parser.addoption("--ascend-real", action="store_true", default=False,
                     help=f"run tests/{ASCEND_LEG} (only that folder: its own process)")


def pytest_ignore_collect(collection_path, config):
    in_leg = ASCEND_LEG in Path(collection_path).parts
    if config.getoption("--ascend-real"):
        return None if in_leg or collection_path == Path(__file__).parent else True
    return True if in_leg else None


#: What makes a test start processes (gloo worlds, fresh interpreters, vLLM
#: servers, emulated hosts) or train a tiny model: ``make test-fast`` leaves
#: such tests out (marker ``processes``, set at collection).
_PROCESS_STARTERS = ("run_distributed(", "subprocess.", "load_vllm_plugins_in_fresh_process(",
                     "make_tiny_checkpoint(", "tiny_checkpoint", "VllmServer(", "TwoHosts(")


def _starts_processes(item, seen: dict) -> bool:
    import inspect

    funcs = [getattr(item, "function", None)]
    for defs in getattr(item, "_fixtureinfo", None).name2fixturedefs.values():
        funcs.extend(d.func for d in defs)
    for func in funcs:
        if func is None:
            continue
        if func not in seen:
            try:
                source = inspect.getsource(func)
            except (OSError, TypeError):
                source = ""
            seen[func] = any(s in source for s in _PROCESS_STARTERS)
        if seen[func]:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    seen: dict = {}
    for item in items:
        if _starts_processes(item, seen):
            item.add_marker(pytest.mark.processes)


def pytest_sessionstart(session):
    from tests import suite_hygiene

    session.config._vllm_ascend_ext_hygiene = suite_hygiene.snapshot()
    # Before any engine starts (the e2e harness reads the environment at import).
    session.config._vllm_ascend_ext_rpc_folder = suite_hygiene.own_rpc_folder()
    _watch_servers()


def _watch_servers() -> None:
    """Count every ``vllm serve`` the run starts, on one host or two; when
    one stops, note its log files and the init files they name."""
    from tests.suite_hygiene import COUNTS, note_engine_log, note_server_logs
    from vllm_ascend_ext.tools.local_server import VllmServer
    from vllm_ascend_ext.tools.multinode.serve import TwoHostServer

    def noted(cls, logs) -> None:
        original = cls.stop
        if getattr(original, "_noted", False):
            return

        def stop(self, *args, **kwargs):
            try:
                return original(self, *args, **kwargs)
            finally:
                paths = [p for p in logs(self) if p is not None]
                note_engine_log("".join(p.read_text(errors="replace")
                                        for p in paths if p.exists()))
                note_server_logs(paths)

        stop._noted = True
        cls.stop = stop

    noted(VllmServer, lambda server: [server.log_path])
    noted(TwoHostServer, lambda server: [p.log_path for p in server.processes])

    def counted(cls, method: str, field: str) -> None:
        original = getattr(cls, method)
        if getattr(original, "_counted", False):
            return

        def wrapper(self, *args, **kwargs):
            setattr(COUNTS, field, getattr(COUNTS, field) + 1)
            return original(self, *args, **kwargs)

        wrapper._counted = True
        setattr(cls, method, wrapper)

    counted(VllmServer, "start", "servers")
    counted(TwoHostServer, "launch", "two_host_servers")


def pytest_sessionfinish(session, exitstatus):
    """Close the engine drivers, then fail the run if it left a process
    behind; delete the vLLM shared-memory segments its engines left."""
    from tests import suite_hygiene

    if "tests.e2e.harness" in sys.modules:
        sys.modules["tests.e2e.harness"].DRIVERS.close()
    for name in ("dist_utils", "tests.dist_utils"):  # imported under either name
        if name in sys.modules:
            sys.modules[name].WORLDS.close()
    leftovers = suite_hygiene.leftover_processes()
    before = getattr(session.config, "_vllm_ascend_ext_hygiene", None)
    removed = (suite_hygiene.remove_leftover_segments(before, suite_hygiene.OWNED_INIT_IDS)
               if before else [])
    sockets = suite_hygiene.remove_rpc_folder(
        getattr(session.config, "_vllm_ascend_ext_rpc_folder", None))
    if leftovers:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    kept_logs = suite_hygiene.settle_server_logs(passed=session.exitstatus == 0)
    session.config._vllm_ascend_ext_report = (leftovers, removed, sockets, kept_logs)
    suite_hygiene.write_counts(os.environ.get("VLLM_ASCEND_EXT_SUITE_STATS"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.suite_hygiene import COUNTS

    leftovers, removed, sockets, kept_logs = getattr(config, "_vllm_ascend_ext_report",
                                                     ([], [], 0, []))
    terminalreporter.write_line(f"started: {COUNTS.line()}")
    terminalreporter.write_line(
        f"removed {len(removed)} vLLM shared-memory segments / init files and {sockets} "
        "IPC sockets left by this run")
    for line in leftovers:
        terminalreporter.write_line(f"ERROR: process left behind (killed): {line}", red=True)
    if kept_logs:  # a failed run keeps its servers' logs for reading
        terminalreporter.write_line("server logs kept: " + " ".join(map(str, kept_logs)))


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(arch) -> Path`` of a saved tiny checkpoint."""
    from vllm_ascend_ext.tools.tiny_models import tiny_checkpoint

    return tiny_checkpoint
