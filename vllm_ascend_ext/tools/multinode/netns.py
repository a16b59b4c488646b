"""Two emulated hosts on one Linux machine: two network namespaces joined by
a veth pair, each with its own ``/dev/shm``.

vLLM decides "same node or not" from shared memory (``in_the_same_node_as``)
and talks between nodes over TCP, so two namespaces with private ``/dev/shm``
mounts look to it exactly like two machines on one link.  The link can be
shaped (``tc ... tbf``) and its bytes counted from the veth's counters, which
see only traffic between the two hosts.

Every address used is one this module gives to the namespaces it creates
(``10.213.<n>.1`` and ``.2``); nothing is routed to or from the machine's own
network.  :meth:`TwoHosts.close` kills every process left in the namespaces
and deletes them; it runs on ``with`` exit, at interpreter exit, and on
SIGTERM/SIGHUP, so no exit path leaves a namespace behind.

Needs root and iproute2 (``ip``, and ``tc`` for a shaped link);
:func:`missing_requirements` names what is missing.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

__all__ = [
    "Host",
    "LinkCounters",
    "NAMESPACE_PREFIX",
    "TwoHosts",
    "TwoHostsError",
    "leftover_namespaces",
    "list_namespaces",
    "missing_requirements",
    "shm_files",
]

#: Every namespace this module creates starts with this, followed by the
#: creating process id (so a crashed run's leftovers can be recognised).
NAMESPACE_PREFIX = "fc2h-"

_CLONE_NEWNET = 0x40000000


class TwoHostsError(RuntimeError):
    """The two-host fixture could not be set up."""


def missing_requirements(shaped: bool = False) -> list[str]:
    """What this machine lacks for the fixture (empty when it can run)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces need CAP_SYS_ADMIN)")
    for tool in ("ip", "unshare") + (("tc",) if shaped else ()):
        if shutil.which(tool) is None:
            missing.append(f"the `{tool}` command")
    return missing


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TwoHostsError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def leftover_namespaces() -> list[str]:
    """Namespaces of this module whose creating process is gone."""
    stale = []
    for name in list_namespaces():
        if not name.startswith(NAMESPACE_PREFIX):
            continue
        pid = name[len(NAMESPACE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            stale.append(name)
    return stale


def namespace_pids(namespace: str) -> list[int]:
    out = _run("ip", "netns", "pids", namespace, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _delete_namespace(namespace: str) -> None:
    """Kill whatever still runs in ``namespace``, then delete it."""
    for _ in range(50):
        pids = namespace_pids(namespace)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _run("ip", "netns", "del", namespace, check=False)


@dataclass(frozen=True)
class Host:
    """One emulated host: its namespace, its end of the link and its address."""

    index: int
    namespace: str
    interface: str
    address: str

    def env(self) -> dict[str, str]:
        """What vLLM and gloo need on this host: without ``VLLM_HOST_IP``
        vLLM finds no default route and advertises 0.0.0.0; without
        ``GLOO_SOCKET_IFNAME`` gloo resolves the hostname to 127.0.0.1 and
        the other host cannot reach it."""
        return {"VLLM_HOST_IP": self.address, "GLOO_SOCKET_IFNAME": self.interface}

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host: its network namespace, and a
        private tmpfs on ``/dev/shm`` (gone when its last process exits)."""
        quoted = " ".join(_sh_quote(a) for a in argv)
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                "mount -t tmpfs -o size=2g tmpfs /dev/shm && "
                f"exec ip netns exec {self.namespace} {quoted}"]

    def pids(self) -> list[int]:
        return namespace_pids(self.namespace)


def _sh_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


@dataclass(frozen=True)
class LinkCounters:
    """Bytes host 0 sent to host 1 and back, from the veth's counters."""

    sent: int
    received: int

    @property
    def total(self) -> int:
        return self.sent + self.received

    def __sub__(self, other: "LinkCounters") -> "LinkCounters":
        return LinkCounters(self.sent - other.sent, self.received - other.received)


_live: "set[TwoHosts]" = set()
_live_lock = threading.Lock()


def _close_all() -> None:
    with _live_lock:
        live = list(_live)
    for hosts in live:
        hosts.close()


_previous_handlers: dict[int, object] = {}


def _on_signal(signum, frame):
    # A second signal (``timeout``, ``pkill`` and shells often send two) must
    # not cut the clean-up short: ignore it until the namespaces are gone.
    signal.signal(signum, signal.SIG_IGN)
    _close_all()
    previous = _previous_handlers.get(signum)
    if callable(previous):
        signal.signal(signum, previous)
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_hooks_installed = False


def _install_exit_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_close_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            # Whoever handled the signal before (vLLM, pytest) still does,
            # after the namespaces are deleted.
            _previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)


_counter = iter(range(1, 1 << 30))


@dataclass(eq=False)
class TwoHosts:
    """Two namespaces and a veth pair; optionally a shaped link.

    ``rate`` is tc's notation (``"400mbit"``); ``None`` leaves the link at
    veth speed.  Use as a context manager or call :meth:`close`."""

    rate: str | None = None
    hosts: tuple[Host, Host] = field(init=False)
    closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        missing = missing_requirements(shaped=self.rate is not None)
        if missing:
            raise TwoHostsError("the two-host fixture needs " + ", ".join(missing))
        for name in leftover_namespaces():
            _delete_namespace(name)
        n = next(_counter)
        tag = f"{NAMESPACE_PREFIX}{os.getpid()}-{n}"
        subnet = f"10.213.{(os.getpid() * 7 + n) % 250 + 1}"
        self.hosts = tuple(
            Host(index=i, namespace=f"{tag}-{i}", interface=f"fc2v{n}h{i}",
                 address=f"{subnet}.{i + 1}")
            for i in range(2))
        _install_exit_hooks()
        with _live_lock:
            _live.add(self)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        h0, h1 = self.hosts
        for h in self.hosts:
            _run("ip", "netns", "add", h.namespace)
        _run("ip", "link", "add", h0.interface, "type", "veth", "peer", "name", h1.interface)
        for h in self.hosts:
            _run("ip", "link", "set", h.interface, "netns", h.namespace)
            _run("ip", "-n", h.namespace, "addr", "add", f"{h.address}/24", "dev", h.interface)
            _run("ip", "-n", h.namespace, "link", "set", h.interface, "up")
            _run("ip", "-n", h.namespace, "link", "set", "lo", "up")
            if self.rate is not None:
                # Each end shapes what it sends: both directions at `rate`.
                _run("ip", "netns", "exec", h.namespace, "tc", "qdisc", "add", "dev",
                     h.interface, "root", "tbf", "rate", self.rate, "burst", "64kb",
                     "latency", "100ms")

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def worker(self) -> Host:
        return self.hosts[1]

    def counters(self) -> LinkCounters:
        """Bytes that crossed the link so far (host 0's view)."""
        h0 = self.hosts[0]
        out = _run("ip", "-n", h0.namespace, "-s", "-j", "link", "show", h0.interface).stdout
        stats = json.loads(out)[0]["stats64"]
        return LinkCounters(sent=int(stats["tx"]["bytes"]), received=int(stats["rx"]["bytes"]))

    def pids(self) -> list[int]:
        return [p for h in self.hosts for p in h.pids()]

    def enter(self, host: Host) -> None:
        """Move the *calling thread* into ``host``'s network namespace
        (sockets it then creates live there; other threads are unaffected)."""
        fd = os.open(f"/run/netns/{host.namespace}", os.O_RDONLY)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise TwoHostsError(f"setns({host.namespace}) failed: {os.strerror(err)}")
        finally:
            os.close(fd)

    def close(self) -> None:
        """Kill every process in both namespaces and delete them. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for h in getattr(self, "hosts", ()):
            _delete_namespace(h.namespace)
        with _live_lock:
            _live.discard(self)

    def __enter__(self) -> "TwoHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shm_files(host: Host) -> set[str]:
    """Names in ``host``'s own ``/dev/shm`` (seen through one of its
    processes); empty when nothing runs there."""
    for pid in host.pids():
        try:
            return set(os.listdir(f"/proc/{pid}/root/dev/shm"))
        except OSError:
            continue
    return set()
