"""What the suite leaves behind, and what it started: checked and reported
once per pytest run (``tests/conftest.py`` calls these at session start and
finish).

- vLLM CPU's shared-memory communicator names its segments after the
  engine's ``vllm_dist_<uuid>`` init file (``VLLM_DIST_IDENT``); a worker
  that does not run its clean-up (SIGTERM, SIGKILL, a crash) leaves them in
  /dev/shm, and the init files in the temp folder. Only entries created
  during this run are removed: another vLLM on the machine keeps its own.
- Every process this run started must be gone at its end.
- The engines, drivers and servers this run started are counted, so that
  ``.ci/run`` can report where a leg's time went.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SHM = Path("/dev/shm")
VLLM_SEGMENT_PREFIX = "vllm_dist_"


def _vllm_entries() -> set[Path]:
    found: set[Path] = set()
    for folder in (SHM, Path(tempfile.gettempdir())):
        if folder.is_dir():
            found.update(p for p in folder.iterdir() if p.name.startswith(VLLM_SEGMENT_PREFIX))
    return found


@dataclass
class HygieneSnapshot:
    entries: set[Path]
    started: float


def snapshot() -> HygieneSnapshot:
    return HygieneSnapshot(entries=_vllm_entries(), started=time.time())


def _in_use() -> set[str]:
    """Paths that a live process has mapped or open (another run's engine
    may be using a segment this run saw appear)."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            used.update(line.split(None, 5)[-1].strip()
                        for line in (proc / "maps").read_text().splitlines()
                        if "/dev/shm/" in line or VLLM_SEGMENT_PREFIX in line)
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if VLLM_SEGMENT_PREFIX in target:
                    used.add(target)
        except OSError:
            continue  # gone, or not ours to read
    return used


def remove_leftover_segments(before: HygieneSnapshot) -> list[Path]:
    """Delete the vLLM shared-memory segments and init files that appeared
    since ``before`` and that no live process uses; return what was deleted."""
    removed = []
    used = _in_use()
    for entry in sorted(_vllm_entries() - before.entries):
        try:
            if entry.stat().st_mtime < before.started - 1 or str(entry) in used:
                continue  # older than this run after all, or still someone's
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


def leftover_processes(grace: float = 15.0) -> list[str]:
    """This process's descendants still alive after ``grace`` seconds; each is
    killed, and described in the returned list."""
    import psutil

    me = psutil.Process()

    def ours() -> list:
        alive = []
        for child in me.children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                # multiprocessing's own helper: it serves this process until it exits
                if "multiprocessing.resource_tracker" in " ".join(child.cmdline()):
                    continue
                alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    deadline = time.monotonic() + grace
    children = ours()
    while children and time.monotonic() < deadline:
        time.sleep(0.5)
        children = ours()
    described = []
    for child in children:
        try:
            described.append(f"pid {child.pid}: {' '.join(child.cmdline())[:200]}")
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return described


@dataclass
class StartCounts:
    """What one pytest run started (the e2e harness and the server classes
    add to it)."""

    engines: int = 0
    engine_drivers: int = 0
    fresh_engine_processes: int = 0
    servers: int = 0
    two_host_servers: int = 0
    gloo_worlds: int = 0  # tests/dist_utils.py worlds spawned (each rank imports vLLM)
    shm_worlds: int = 0  # of those, worlds with vLLM's shared-memory communicator

    def may_leave_segments(self) -> bool:
        """Whether this run started anything that makes vLLM shared-memory
        segments or init files. A run that started none removes none: CI's
        other lane may be starting an engine whose init file no process has
        opened yet."""
        return bool(self.engines or self.servers or self.two_host_servers or self.shm_worlds)

    def line(self) -> str:
        return (f"{self.engines} engines in {self.engine_drivers} engine drivers "
                f"(+{self.fresh_engine_processes} in fresh processes), {self.servers} "
                f"vllm serve servers, {self.two_host_servers} two-host launches, "
                f"{self.gloo_worlds} gloo worlds")


COUNTS = StartCounts()


def write_counts(path: str | None) -> None:
    """Append this run's counts as one JSON line to ``path`` (``.ci/run``
    passes VLLM_ASCEND_EXT_SUITE_STATS to collect every leg's)."""
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), **asdict(COUNTS)}) + "\n")
