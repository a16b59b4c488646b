"""A ``vllm serve`` process on 127.0.0.1, started and stopped cleanly.

Used by ``make demo``, the serve e2e tests and the throughput benchmark, so
that all three start the server the way a user does: the real ``vllm`` CLI,
with the FlashComm2 flags passed as environment variables.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(world_size: int) -> dict[str, str]:
    """Environment a CPU vLLM needs on this kind of small machine."""
    ncpu = max(1, os.cpu_count() or 1)
    bind = "|".join(str(r % ncpu) for r in range(world_size)) if world_size > 1 else (
        f"0-{ncpu - 1}" if ncpu > 1 else "0")
    return {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def vllm_cli() -> str:
    """The ``vllm`` console script of the running interpreter's environment."""
    cand = Path(sys.executable).parent / "vllm"
    return str(cand) if cand.exists() else "vllm"


def engine_args(model: str, dtype: str, speculative_config: dict | None = None,
                log_stats: bool = False) -> list[str]:
    """The ``vllm serve`` arguments every server this project starts shares:
    small limits for a 2-core machine, eager mode, and the CPU attention
    backend stated on purpose."""
    from vllm_ascend_ext.cpu_attention import cpu_attention_backend, draft_speculative_config

    # The MLA backend follows the dtype, never the CPU the run lands on,
    # for the target and for a speculative draft alike.
    backend = cpu_attention_backend(model, dtype)
    spec = draft_speculative_config(speculative_config, backend)
    return [
        "--dtype", dtype, "--max-model-len", "512", "--max-num-seqs", "32",
        "--enforce-eager",
        *([] if log_stats else ["--disable-log-stats"]),
        *(["--attention-backend", backend] if backend else []),
        *(["--speculative-config", json.dumps(spec)] if spec else []),
    ]


def wait_healthy(base_url: str, deadline: float, exited) -> bool:
    """Poll ``base_url/health`` until it answers 200 (True), ``exited()`` is
    true, or ``deadline`` (monotonic) passes (False)."""
    while time.monotonic() < deadline:
        if exited():
            return False
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    return False


@dataclass
class VllmServer:
    model: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dtype: str = "float32"
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    # ``--speculative-config``; its draft gets the target's stated backend.
    speculative_config: dict | None = None
    # Keep vLLM's stat loggers (Prometheus counters on /metrics) running.
    log_stats: bool = False
    port: int = 0
    startup_timeout: float = 600.0
    log_path: Path | None = None
    pgid: int | None = None
    _proc: subprocess.Popen | None = None
    _log_fh: object | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            vllm_cli(), "serve", self.model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--tensor-parallel-size", str(self.tp),
            "--pipeline-parallel-size", str(self.pp),
            "--data-parallel-size", str(self.dp),
            *engine_args(self.model, self.dtype, self.speculative_config, self.log_stats),
            *self.extra_args,
        ]

    def start(self) -> "VllmServer":
        if not self.port:
            self.port = free_port()
        env = dict(os.environ)
        env.update(cpu_env(self.tp * self.pp * self.dp))
        env.update(self.env)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_fh = open(self.log_path, "w")
        # Its own process group: stop() can signal the server and every worker it spawned.
        self._proc = start_process_group(self.command(), env=env, stdout=self._log_fh,
                                         stderr=subprocess.STDOUT)
        self.pgid = self._proc.pid
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        if wait_healthy(self.base_url, deadline, lambda: self._proc.poll() is not None):
            return
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"vllm serve exited with code {self._proc.returncode} during start-up; "
                f"log tail:\n{self.log_tail()}")
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout}s; "
                           f"log tail:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def log_tail(self, n: int = 6000) -> str:
        return self.log_text()[-n:]

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT (vLLM's graceful path), then SIGTERM, then SIGKILL the group."""
        if self._proc is None:
            return None
        rc = stop_process_group(self._proc, timeout)
        self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return rc

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_process_group(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """Start ``argv`` as the leader of a new process group, which
    ``stop_process_group`` stops with everything it spawned.

    A process group inside the caller's session, not a new session: with the
    kernel's autogroup scheduling (sched_autogroup_enabled) each session is a
    scheduling group of its own, at nice 0 whatever its creator's nice. A
    server started from a caller that runs at a lower priority (the suite's
    unit lane) would compete with everything else as an equal.
    """
    if sys.version_info >= (3, 11):
        return subprocess.Popen(argv, process_group=0, **popen_kwargs)
    # Python 3.10 (python_requires' floor) has no ``process_group``: a new
    # session is the only safe way there, at the cost above.
    return subprocess.Popen(argv, start_new_session=True, **popen_kwargs)


def stop_process_group(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """Stop ``proc`` (started by ``start_process_group``) and every process of
    its group: SIGINT (vLLM's graceful path), then SIGTERM, then SIGKILL.
    Returns its exit code."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # Workers in the same group must be gone too. vLLM's workers leave on
    # their own once their engine core is gone, but that can take longer
    # than the grace below; a SIGKILLed process is gone only once reaped,
    # so wait for that too, or a caller that checks at once finds it.
    if process_group_alive(pgid):
        time.sleep(2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 15
        while process_group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return proc.returncode


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
