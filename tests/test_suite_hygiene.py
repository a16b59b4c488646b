"""The suite's own clean-up: it removes the vLLM shared-memory segments that
appeared during the run, and only those."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests import suite_hygiene
from tests.suite_hygiene import SHM, VLLM_SEGMENT_PREFIX, StartCounts

pytestmark = pytest.mark.vllm_independent


@pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm")
def test_removes_only_this_runs_engines_segments_that_appeared_during_the_run():
    def segment(engine: str) -> Path:
        return SHM / f"{VLLM_SEGMENT_PREFIX}{engine}-tp:0-[0-1]-cpushm"

    ours, other_lane, before_run = (uuid.uuid4().hex for _ in range(3))
    older = segment(before_run)
    older.write_bytes(b"x")
    newer, busy, theirs = segment(ours), SHM / f"{VLLM_SEGMENT_PREFIX}{ours}", segment(other_lane)
    unrelated = SHM / f"not-vllm-{uuid.uuid4().hex}"
    try:
        before = suite_hygiene.snapshot()
        for path in (newer, busy, theirs, unrelated):
            path.write_bytes(b"x")
        # This run's engine logged its init file; the other lane's engine
        # (same machine, same time) did not log to this run.
        suite_hygiene.note_engine_log(
            f"INFO distributed_init_method=file:///tmp/{VLLM_SEGMENT_PREFIX}{ours} backend=gloo")
        owned = suite_hygiene.OWNED_INIT_IDS
        assert ours in owned and other_lane not in owned
        with open(busy, "rb"):  # still held by a live process
            removed = suite_hygiene.remove_leftover_segments(before, owned)
        assert removed == [newer] and not newer.exists()
        assert older.exists() and busy.exists() and theirs.exists() and unrelated.exists()
    finally:
        for path in (older, newer, busy, theirs, unrelated):
            path.unlink(missing_ok=True)


def test_counts_are_written_as_one_json_line_per_run(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(suite_hygiene, "COUNTS", StartCounts(engines=3, engine_drivers=1,
                                                             servers=2))
    path = tmp_path / "stats.jsonl"
    suite_hygiene.write_counts(str(path))
    suite_hygiene.write_counts(str(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["engines"] == 3 and lines[0]["servers"] == 2
    assert lines[0]["pid"] == os.getpid()
    suite_hygiene.write_counts(None)  # no path: nothing written, no error


def test_a_legs_counts_add_up_across_its_pytest_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "suite_counts.py"
    spec = importlib.util.spec_from_file_location("suite_counts", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "leg.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in (
        {"pid": 1, "engines": 3, "engine_drivers": 1, "fresh_engine_processes": 0,
         "servers": 2, "two_host_servers": 0},
        {"pid": 2, "engines": 1, "engine_drivers": 1, "fresh_engine_processes": 1,
         "servers": 0, "two_host_servers": 4, "gloo_worlds": 5})) + "\n")
    assert module.summarise(path) == ("4 engines (2 drivers, 1 fresh processes), 2 servers, "
                                      "4 two-host launches, 5 gloo worlds")
    assert module.summarise(tmp_path / "missing.jsonl") == "(no pytest run reported)"


def test_server_logs_go_when_the_run_passed_and_stay_when_it_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(suite_hygiene, "SERVER_LOGS", [])
    logs = [tmp_path / "vllm-serve-a.log", tmp_path / "vllm-host0-b.log"]
    for p in logs:
        p.write_text("INFO ...")
    suite_hygiene.note_server_logs([logs[0], None])
    suite_hygiene.note_server_logs([logs[1], tmp_path / "already-gone.log"])
    assert suite_hygiene.settle_server_logs(passed=False) == logs
    assert all(p.exists() for p in logs)
    assert suite_hygiene.settle_server_logs(passed=True) == []
    assert not any(p.exists() for p in logs) and suite_hygiene.SERVER_LOGS == []


def test_a_runs_ipc_sockets_go_to_a_folder_of_its_own_that_its_end_removes(monkeypatch):
    """vLLM leaves ZMQ IPC socket files in VLLM_RPC_BASE_PATH (745 in the
    temp folder after one full run); the run gives its engines a folder of
    their own and deletes it at its end."""
    import socket

    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    folder = suite_hygiene.own_rpc_folder()
    assert folder is not None and folder.is_dir()
    assert os.environ["VLLM_RPC_BASE_PATH"] == str(folder)
    # What vLLM's get_open_zmq_ipc_path would name, bound and left behind.
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(folder / str(uuid.uuid4())))
    left.close()
    assert suite_hygiene.remove_rpc_folder(folder) == 1
    assert not folder.exists() and "VLLM_RPC_BASE_PATH" not in os.environ


def test_a_callers_own_rpc_folder_is_left_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    assert suite_hygiene.own_rpc_folder() is None
    assert suite_hygiene.remove_rpc_folder(None) == 0
    assert os.environ["VLLM_RPC_BASE_PATH"] == str(tmp_path) and tmp_path.is_dir()


def member_pid(rank: int, world_size: int) -> int:
    return os.getpid()


_WORLD_STARTER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.dist_utils import run_distributed
from tests.test_suite_hygiene import member_pid
print(*run_distributed(member_pid, 2, init_vllm=False, timeout=240), flush=True)
time.sleep(300)
"""


def test_a_worlds_members_die_with_the_process_that_started_them():
    """A pytest killed mid-run (a CI timeout, Ctrl-C on ``make``) left its
    gloo worlds' members waiting on their task queues, and they slowed every
    later run on the machine; they now die with it."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    root = str(Path(__file__).resolve().parents[1])
    starter = subprocess.Popen([sys.executable, "-c", _WORLD_STARTER.format(root=root)],
                               stdout=subprocess.PIPE, text=True)
    try:
        members = [int(pid) for pid in starter.stdout.readline().split()]
        assert len(members) == 2, "the world did not start"
        assert all(psutil.pid_exists(pid) for pid in members)
    finally:
        starter.send_signal(signal.SIGKILL)
        starter.wait()
    deadline = time.monotonic() + 20
    alive = members
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in members if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"world members outlived their starter: {alive}"


def test_a_kept_world_is_stopped_between_calls():
    """Each gloo group's transport thread wakes every 10 ms; a CI run's idle
    kept worlds woke some 35,000 times a second and starved both lanes. A
    kept world is stopped between calls and continued for the next."""
    import time

    import psutil

    from tests.dist_utils import run_distributed

    def stopped(pids) -> bool:
        # SIGSTOP takes effect asynchronously: wait for it, within a bound.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(psutil.Process(pid).status() == psutil.STATUS_STOPPED for pid in pids):
                return True
            time.sleep(0.05)
        return False

    first = run_distributed(member_pid, 2, init_vllm=False, timeout=240)
    assert stopped(first)
    again = run_distributed(member_pid, 2, init_vllm=False, timeout=240)
    assert again == first  # the same world, continued
    assert stopped(again)


_EXITING_STARTER = """
import sys
sys.path.insert(0, {root!r})
from tests.dist_utils import run_distributed
from tests.test_suite_hygiene import member_pid
print(*run_distributed(member_pid, 2, init_vllm=False, timeout=240), flush=True)
"""


def test_a_starter_that_exits_with_stopped_worlds_ends_them():
    """Without pytest's session end (a script, a plugin's early exit): the
    exit continues the stopped members before multiprocessing's own exit
    handler signals them and waits."""
    import subprocess
    import sys

    import psutil

    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", _EXITING_STARTER.format(root=root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    members = [int(pid) for pid in done.stdout.split()]
    assert len(members) == 2
    alive = [pid for pid in members if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"world members outlived their starter: {alive}"
