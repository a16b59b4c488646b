"""The suite's lower-priority work stays at its lower priority.

With the kernel's autogroup scheduling every session is a scheduling group
with a nice of its own, and a task's own nice ranks it only inside its
session. ``scripts/lanes.sh`` and ``.ci/run`` start each lane as a session, so
`nice -n 10` alone left the unit lane an equal share of the 2 cores beside the
engine lane; and a server or engine driver started as a new session from the
unit lane ran at nice 0 whatever the lane's nice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_ascend_ext.tools.local_server import VllmServer, start_process_group

ROOT = Path(__file__).resolve().parents[1]
AUTOGROUP = Path("/proc/self/autogroup")
_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")

# Each test starts a process or two (for a moment): not in ``make test-fast``.
pytestmark = [pytest.mark.vllm_independent, pytest.mark.processes]

needs_autogroup = pytest.mark.skipif(
    not AUTOGROUP.exists() or (_ENABLED.exists() and _ENABLED.read_text().strip() == "0"),
    reason="needs the kernel's autogroup scheduling (CONFIG_SCHED_AUTOGROUP, "
           "kernel.sched_autogroup_enabled=1)")


def _autogroup(pid: int | str = "self") -> tuple[str, int]:
    """(autogroup name, its nice) of a process."""
    name, nice = re.fullmatch(r"(\S+) nice (-?\d+)",
                              Path(f"/proc/{pid}/autogroup").read_text().strip()).groups()
    return name, int(nice)


@needs_autogroup
def test_the_unit_lane_runs_at_a_lower_priority_than_the_engine_lane():
    probe = "cat /proc/self/autogroup; nice"
    env = {k: v for k, v in os.environ.items() if k != "LANES_ENGINE_DONE"}
    out = subprocess.run(["bash", str(ROOT / "scripts/lanes.sh"), probe, probe], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    seen = {}
    for lane in ("engine", "unit"):
        lines = [ln.split("] ", 1)[1] for ln in out.splitlines()
                 if ln.startswith(f"[{lane} lane] ") and "===" not in ln]
        group, nice = re.fullmatch(r"(\S+) nice (-?\d+)", lines[0]).groups()
        seen[lane] = (group, int(nice), int(lines[1]))
    (engine_group, engine_group_nice, engine_nice) = seen["engine"]
    (unit_group, unit_group_nice, unit_nice) = seen["unit"]
    assert engine_group != unit_group, out  # a session, and a scheduling group, each
    assert (engine_group_nice, unit_group_nice) == (0, 10), out
    assert unit_nice == min(19, engine_nice + 10), out


def test_lanes_say_when_the_engine_lane_is_done_and_keep_the_file_to_themselves(tmp_path):
    """``LANES_ENGINE_DONE`` (``.ci/run`` starts the range engines on it) is
    touched once the engine lane has ended, while the unit lane still runs;
    neither lane's command sees the variable, so a lanes.sh that a test runs
    inside a lane can never touch CI's file (6bfcf86 let it through, and the
    range engines started beside leg 1's)."""
    done = tmp_path / "engine-lane-done"
    engine = 'echo "seen=${LANES_ENGINE_DONE-unset}"'
    # The unit lane ends only once the file is there (bounded: 30 s).
    unit = (f'for i in $(seq 300); do [ -e "{done}" ] && break; sleep 0.1; done; '
            f'[ -e "{done}" ] && echo "file-before-unit-end"; '
            'echo "seen=${LANES_ENGINE_DONE-unset}"')
    env = {**os.environ, "LANES_ENGINE_DONE": str(done)}
    out = subprocess.run(["bash", str(ROOT / "scripts/lanes.sh"), engine, unit], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "[unit lane] file-before-unit-end" in out, out
    assert out.count("seen=unset") == 2 and "seen=/" not in out, out


def test_lanes_touch_no_file_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("LANES_ENGINE_DONE", raising=False)
    subprocess.run(["bash", str(ROOT / "scripts/lanes.sh"), "true", "true"], cwd=tmp_path,
                   capture_output=True, text=True, timeout=60, check=True)
    assert list(tmp_path.iterdir()) == []


@needs_autogroup
def test_a_started_process_group_keeps_its_starters_scheduling_group():
    proc = start_process_group([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert os.getpgid(proc.pid) == proc.pid  # a group of its own, to stop whole
        assert os.getsid(proc.pid) == os.getsid(0)
        assert _autogroup(proc.pid) == _autogroup()
    finally:
        proc.kill()
        proc.wait()


@needs_autogroup
def test_vllm_serve_keeps_its_starters_scheduling_group(monkeypatch):
    """The server (``make demo``, the serve tests, the benchmarks): its process
    group is stopped whole, and it runs in its starter's scheduling group."""
    from tests.suite_hygiene import COUNTS

    monkeypatch.setattr(COUNTS, "servers", COUNTS.servers)  # not a server the run started
    server = VllmServer(model="unused")
    monkeypatch.setattr(VllmServer, "command",
                        lambda self: [sys.executable, "-c", "import time; time.sleep(30)"])
    monkeypatch.setattr(VllmServer, "_wait_healthy", lambda self: None)
    with server:
        pid = server.pgid
        assert os.getpgid(pid) == pid
        assert _autogroup(pid) == _autogroup()
    assert server.log_path is not None
    server.log_path.unlink()


@needs_autogroup
def test_an_engine_driver_keeps_its_starters_scheduling_group():
    from tests.e2e.harness import EngineDriver, engine_env

    driver = EngineDriver(engine_env(2))
    try:
        assert os.getpgid(driver.proc.pid) == driver.proc.pid
        assert _autogroup(driver.proc.pid) == _autogroup()
    finally:
        driver.close(kill=True)


_STUBBORN_GROUP = """
import os, signal, sys, time
if os.fork() == 0:  # a worker that outlives SIGINT and SIGTERM, as a busy one may
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.01)
time.sleep(60)
"""


def test_stopping_a_group_returns_once_every_member_is_gone():
    """A server's workers that outlive its API server are SIGKILLed; the stop
    returns only once they are gone (a serve test found one still there)."""
    from vllm_ascend_ext.tools.local_server import process_group_alive, stop_process_group

    for _ in range(3):  # the race it had is lost or won by a few ms
        proc = start_process_group([sys.executable, "-c", _STUBBORN_GROUP])
        time.sleep(0.3)
        stop_process_group(proc, timeout=0.2)
        assert not process_group_alive(proc.pid)
