"""The two-host fixture itself: real namespaces, a real veth, real processes
inside them; and that no exit path leaves a namespace, a process or a
/dev/shm file behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from vllm_ascend_ext.tools.local_server import start_process_group
from vllm_ascend_ext.tools.multinode.netns import (
    TwoHosts,
    list_namespaces,
    missing_requirements,
    shm_files,
)

_missing = missing_requirements(shaped=True)
pytestmark = [
    pytest.mark.skipif(bool(_missing), reason="two emulated hosts need " + ", ".join(_missing)),
    # Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
    pytest.mark.vllm_independent,
    # Network namespaces: in CI's engine lane, one at a time with the
    # two-host engines, never beside them.
    pytest.mark.engine_lane,
]

PY = sys.executable


def _start_in(host, code: str) -> subprocess.Popen:
    return start_process_group(host.command([PY, "-c", code]), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)


def _connect_from(pair: TwoHosts, host, address: str, port: int, payload: bytes) -> bytes:
    """Open a TCP connection from inside ``host`` (a thread that entered it)."""
    out: list[bytes] = []

    def run() -> None:
        pair.enter(host)
        for _ in range(100):  # the server may still be starting: bounded retries
            try:
                with socket.create_connection((address, port), timeout=5) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    out.append(b"".join(iter(lambda: s.recv(65536), b"")))
                    return
            except OSError:
                time.sleep(0.1)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert out, "no connection between the hosts"
    return out[0]


ECHO = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(({addr!r}, 7700)); s.listen(1)
c, _ = s.accept(); data = b''
while True:
    b = c.recv(65536)
    if not b: break
    data += b
c.sendall(data); c.close()
"""


def test_hosts_talk_over_the_link_and_it_is_counted():
    with TwoHosts() as pair:
        server = _start_in(pair.worker, ECHO.format(addr=pair.worker.address))
        before = pair.counters()
        payload = os.urandom(1 << 20)
        assert _connect_from(pair, pair.head, pair.worker.address, 7700, payload) == payload
        server.wait(30)
        used = pair.counters() - before
        # 1 MiB each way plus TCP/IP headers.
        assert (1 << 20) <= used.sent < 1.2 * (1 << 20)
        assert (1 << 20) <= used.received < 1.2 * (1 << 20)
        names = [h.namespace for h in pair.hosts]
    assert not set(names) & set(list_namespaces())


def test_a_shaped_link_has_its_rate():
    with TwoHosts(rate="200mbit") as pair:
        for h in pair.hosts:
            out = subprocess.run(["ip", "netns", "exec", h.namespace, "tc", "qdisc", "show",
                                  "dev", h.interface], capture_output=True, text=True).stdout
            assert "tbf" in out and "200Mbit" in out, out


def test_each_host_has_its_own_dev_shm():
    machine_before = set(os.listdir("/dev/shm"))
    with TwoHosts() as pair:
        name = f"fc2-fixture-{os.getpid()}"
        p = _start_in(pair.head, f"open('/dev/shm/{name}', 'w').write('x'); "
                                 "import time; time.sleep(60)")
        q = _start_in(pair.worker, "import time; time.sleep(60)")
        for _ in range(100):
            if name in shm_files(pair.head):
                break
            time.sleep(0.1)
        assert name in shm_files(pair.head)
        assert name not in shm_files(pair.worker)
        assert name not in os.listdir("/dev/shm")
    # close() killed both processes; the host's tmpfs went with them.
    assert p.poll() is not None and q.poll() is not None
    assert name not in os.listdir("/dev/shm") and name not in machine_before


_CREATOR = """
import sys, time
from vllm_ascend_ext.tools.multinode.netns import TwoHosts
pair = TwoHosts()
import subprocess
subprocess.Popen(pair.worker.command([sys.executable, '-c', 'import time; time.sleep(300)']),
                 start_new_session=True)
print(pair.head.namespace, pair.worker.namespace, flush=True)
time.sleep(300)
"""


def _creator() -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ)
    proc = subprocess.Popen([PY, "-c", _CREATOR], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    names = proc.stdout.readline().split()
    assert len(names) == 2, "the creator did not set up its hosts"
    for _ in range(100):  # its sleeping process has entered the worker host
        if subprocess.run(["ip", "netns", "pids", names[1]], capture_output=True,
                          text=True).stdout.strip():
            break
        time.sleep(0.1)
    return proc, names


def _pids_in(names: list[str]) -> list[str]:
    found = []
    for n in names:
        if n in list_namespaces():
            found += subprocess.run(["ip", "netns", "pids", n], capture_output=True,
                                    text=True).stdout.split()
    return found


def test_sigterm_of_the_creator_removes_namespaces_and_processes():
    """Two SIGTERMs in a row (as `timeout` + `pkill` send them): the second
    must not cut the clean-up short (it did: the first run of the two-host
    benchmark, stopped that way, left both namespaces and servers behind)."""
    proc, names = _creator()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert not set(names) & set(list_namespaces())
    assert _pids_in(names) == []


def test_a_killed_creators_leftovers_are_removed_by_the_next_fixture():
    proc, names = _creator()
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs
    proc.wait(30)
    assert set(names) <= set(list_namespaces())
    with TwoHosts():
        assert not set(names) & set(list_namespaces())
        assert _pids_in(names) == []


def test_a_failed_start_leaves_nothing_behind(tmp_path):
    from vllm_ascend_ext.tools.multinode.serve import TwoHostServer, TwoHostStartError

    with TwoHosts() as pair:
        server = TwoHostServer(pair, str(tmp_path / "no-such-model"), startup_timeout=240)
        with pytest.raises(TwoHostStartError, match="did not start"):
            server.start()
        assert pair.pids() == [], "start() failed but left processes in the hosts"
        names = [h.namespace for h in pair.hosts]
    assert not set(names) & set(list_namespaces())
