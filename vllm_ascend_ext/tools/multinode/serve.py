"""``vllm serve`` across two emulated hosts, as vLLM's own multi-node launch.

Two layouts, the two that vllm-ascend documents for two nodes:

* ``"tp"``: one engine whose TP group spans both hosts
  (``--nnodes 2 --node-rank N --master-addr HEAD``; host 1 ``--headless``),
  ``tp // 2`` ranks on each host;
* ``"dp"``: one data-parallel replica per host
  (``--data-parallel-size 2 --data-parallel-size-local 1``; host 1
  ``--headless --data-parallel-start-rank 1``), each with ``tp`` local ranks.

Each host gets its own environment and arguments (``head_env`` /
``worker_env``, ``head_args`` / ``worker_args``), so a test can give the two
hosts different flags on purpose.  Clients reach the head's API server on
``base_url`` (a loopback relay into the head host).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_ascend_ext.tools.local_server import (
    cpu_env,
    engine_args,
    start_process_group,
    stop_process_group,
    vllm_cli,
    wait_healthy,
)
from vllm_ascend_ext.tools.multinode.netns import Host, TwoHosts
from vllm_ascend_ext.tools.multinode.relay import LoopbackRelay

__all__ = ["HostProcess", "TwoHostServer", "TwoHostStartError", "host_cpu_bind"]

API_PORT = 8000
MASTER_PORT = 29555
DP_RPC_PORT = 29556


def host_cpu_bind(node: int, ranks_per_host: int, ncpu: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for one emulated host's ranks, or
    ``None`` to keep :func:`cpu_env`'s machine-wide binding.

    Real hosts do not share cores. Left to ``cpu_env``, a host with one rank
    binds it to every core of the machine, so the two hosts' workers run
    their OpenMP threads on the same cores and time each other's
    collectives. Here the machine's cores are split in two, host ``node``
    takes its half and each of its ranks a contiguous share of it. Where
    the machine has fewer cores than ranks (the DP layout's four ranks on
    two cores) no split leaves each rank a core of its own, and pairing
    spin-waiting ranks on one core stalls vLLM's shared-memory all-reduce,
    so the binding stays machine-wide."""
    if ncpu < 2 * ranks_per_host:
        return None
    per_host = ncpu // 2
    per_rank = per_host // ranks_per_host
    first = node * per_host
    spans = []
    for r in range(ranks_per_host):
        lo = first + r * per_rank
        hi = lo + per_rank - 1
        spans.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return "|".join(spans)


class TwoHostStartError(RuntimeError):
    """A host's ``vllm serve`` exited, or never became healthy, during start-up."""


@dataclass
class HostProcess:
    """One host's ``vllm serve`` process and its log."""

    host: Host
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    exited_at: float | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        with open(self.log_path, "w") as log:
            # A process group per host: stop() signals the server and every
            # process it spawned.
            self.proc = start_process_group(self.host.command(self.argv), env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)

    def poll(self) -> int | None:
        rc = self.proc.poll() if self.proc is not None else None
        if rc is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
        return rc

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        rc = stop_process_group(self.proc, timeout)
        self.poll()
        return rc


@dataclass
class TwoHostServer:
    """vLLM served from two hosts; the head (host 0) runs the API server."""

    hosts: TwoHosts
    model: str
    tp: int = 2
    layout: str = "tp"
    dtype: str = "float32"
    head_env: dict[str, str] = field(default_factory=dict)
    worker_env: dict[str, str] = field(default_factory=dict)
    head_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    startup_timeout: float = 600.0
    processes: list[HostProcess] = field(default_factory=list)
    _relay: LoopbackRelay | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("tp", "dp"):
            raise ValueError(f"layout={self.layout!r}: expected 'tp' or 'dp'")
        if self.layout == "tp" and self.tp % 2:
            raise ValueError(f"tp={self.tp}: a TP group across two hosts needs an even size")

    # -- commands -------------------------------------------------------------

    def ranks_per_host(self) -> int:
        return self.tp // 2 if self.layout == "tp" else self.tp

    def _layout_args(self, node: int) -> list[str]:
        head = self.hosts.head.address
        if self.layout == "tp":
            args = ["--tensor-parallel-size", str(self.tp), "--nnodes", "2",
                    "--node-rank", str(node), "--master-addr", head,
                    "--master-port", str(MASTER_PORT)]
        else:
            args = ["--tensor-parallel-size", str(self.tp), "--data-parallel-size", "2",
                    "--data-parallel-size-local", "1", "--data-parallel-address", head,
                    "--data-parallel-rpc-port", str(DP_RPC_PORT)]
            if node:
                args += ["--data-parallel-start-rank", str(node)]
        return args

    def command(self, node: int) -> list[str]:
        host = self.hosts.hosts[node]
        where = (["--headless"] if node else
                 ["--host", host.address, "--port", str(API_PORT)])
        own = self.worker_args if node else self.head_args
        return [vllm_cli(), "serve", self.model, *where, *self._layout_args(node),
                *engine_args(self.model, self.dtype), *own]

    def environment(self, node: int) -> dict[str, str]:
        host = self.hosts.hosts[node]
        env = dict(os.environ)
        env.update(cpu_env(self.ranks_per_host()))
        bind = host_cpu_bind(node, self.ranks_per_host(), os.cpu_count() or 1)
        if bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        env.update(host.env())
        env.update(self.worker_env if node else self.head_env)
        return env

    # -- life cycle -----------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._relay is None:
            raise RuntimeError("the two-host server is not started")
        return f"http://127.0.0.1:{self._relay.port}"

    def launch(self) -> "TwoHostServer":
        """Start both hosts' processes (headless first) without waiting."""
        self.processes = []
        for node in (1, 0):
            fd, name = tempfile.mkstemp(prefix=f"vllm-host{node}-", suffix=".log")
            os.close(fd)
            p = HostProcess(host=self.hosts.hosts[node], argv=self.command(node),
                            env=self.environment(node), log_path=Path(name))
            p.start()
            self.processes.append(p)
        self.processes.sort(key=lambda p: p.host.index)
        head = self.hosts.head
        self._relay = LoopbackRelay(lambda: self.hosts.enter(head), head.address, API_PORT)
        return self

    def start(self) -> "TwoHostServer":
        """Start both hosts and wait until the head serves."""
        self.launch()
        deadline = time.monotonic() + self.startup_timeout
        healthy = wait_healthy(self.base_url, deadline, self.any_exited)
        if not healthy:
            codes = [p.poll() for p in self.processes]
            tails = self.log_tails()
            self.stop()
            raise TwoHostStartError(
                f"two-host vllm serve did not start (exit codes head={codes[0]}, "
                f"headless={codes[1]}):\n{tails}")
        return self

    def any_exited(self) -> bool:
        return any(p.poll() is not None for p in self.processes)

    def wait_exited(self, timeout: float) -> list[int | None]:
        """Wait up to ``timeout`` s for both hosts' processes to exit; their
        exit codes (None: still running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.5)
        return [p.poll() for p in self.processes]

    def log_text(self, node: int = 0) -> str:
        return self.processes[node].log_text() if self.processes else ""

    def log_tails(self, n: int = 4000) -> str:
        return "\n".join(f"--- host {p.host.index} ({p.host.address}) log tail ---\n"
                         f"{p.log_text()[-n:]}" for p in self.processes)

    def stop(self, timeout: float = 30.0) -> list[int | None]:
        """Stop both hosts (head first) and make sure nothing is left running
        in either namespace."""
        if self._relay is not None:
            self._relay.close()
        codes = [p.stop(timeout) for p in self.processes]
        for _ in range(100):
            if not self.hosts.pids():
                break
            for pid in self.hosts.pids():
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return codes

    def __enter__(self) -> "TwoHostServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
