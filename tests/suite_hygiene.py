"""What the suite leaves behind, and what it started: checked and reported
once per pytest run (``tests/conftest.py`` calls these at session start and
finish).

- vLLM CPU's shared-memory communicator names its segments after the
  engine's ``vllm_dist_<uuid>`` init file (``VLLM_DIST_IDENT``); a worker
  that does not run its clean-up (SIGTERM, SIGKILL, a crash) leaves them in
  /dev/shm, and the init files in the temp folder. Only entries of this
  run's own engines and servers are removed (their logs name the init file),
  once no process holds them: another vLLM on the machine, or the other lane
  of ``make test``, keeps its own, even one whose workers have not opened
  their init file yet.
- vLLM names a ZMQ IPC socket file in ``VLLM_RPC_BASE_PATH`` (the temp
  folder by default) for each engine core, API server and worker channel,
  and leaves most of them behind (745 in one full run). Each run points
  its engines at a folder of its own, removed at its end.
- Every process this run started must be gone at its end.
- Each ``vllm serve`` (one host or two) writes its log to a file in the temp
  folder; those of a run that passed are removed, those of a failed run are
  kept for reading and named in the summary (524 had piled up here).
- The engines, drivers and servers this run started are counted, so that
  ``.ci/run`` can report where a leg's time went.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SHM = Path("/dev/shm")
VLLM_SEGMENT_PREFIX = "vllm_dist_"
# The id in an init file's name (vllm.utils.network_utils), which its
# segments' names begin with too.
_INIT_ID = re.compile(VLLM_SEGMENT_PREFIX + r"([0-9a-f]{32})")

#: Init-file ids named in the logs of this run's engines and servers.
OWNED_INIT_IDS: set[str] = set()


def note_engine_log(text: str) -> None:
    """Remember the init files (and with them the segments) that an engine
    or server this run started names in its log."""
    OWNED_INIT_IDS.update(_INIT_ID.findall(text))


#: Logs of the servers this run stopped.
SERVER_LOGS: list[Path] = []


def note_server_logs(paths) -> None:
    SERVER_LOGS.extend(Path(p) for p in paths if p is not None)


def settle_server_logs(passed: bool) -> list[Path]:
    """Remove the noted server logs if the run passed; return those kept."""
    if not passed:
        return [p for p in SERVER_LOGS if p.exists()]
    for p in SERVER_LOGS:
        p.unlink(missing_ok=True)
    SERVER_LOGS.clear()
    return []


def _vllm_entries() -> set[Path]:
    found: set[Path] = set()
    for folder in (SHM, Path(tempfile.gettempdir())):
        if folder.is_dir():
            found.update(p for p in folder.iterdir() if p.name.startswith(VLLM_SEGMENT_PREFIX))
    return found


RPC_FOLDER_PREFIX = "vllm-ascend-ext-rpc-"


def own_rpc_folder() -> Path | None:
    """Point this run's vLLM processes (they inherit the environment) at a
    new folder for their IPC sockets and return it; None where the caller
    chose a ``VLLM_RPC_BASE_PATH`` of their own."""
    if os.environ.get("VLLM_RPC_BASE_PATH"):
        return None
    folder = Path(tempfile.mkdtemp(prefix=RPC_FOLDER_PREFIX))
    os.environ["VLLM_RPC_BASE_PATH"] = str(folder)
    return folder


def remove_rpc_folder(folder: Path | None) -> int:
    """Delete the run's IPC socket folder (its processes are gone by now);
    return how many entries it held."""
    if folder is None or not folder.is_dir():
        return 0
    held = sum(1 for _ in folder.iterdir())
    shutil.rmtree(folder, ignore_errors=True)
    if os.environ.get("VLLM_RPC_BASE_PATH") == str(folder):
        del os.environ["VLLM_RPC_BASE_PATH"]
    return held


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


def remove_leftover_segments(before: HygieneSnapshot, owned: set[str]) -> list[Path]:
    """Delete the vLLM shared-memory segments and init files of the engines
    whose init-file ids are ``owned``, that appeared since ``before`` and that
    no live process uses; return what was deleted."""
    removed = []
    used = _in_use()
    for entry in sorted(_vllm_entries() - before.entries):
        found = _INIT_ID.match(entry.name)
        if found is None or found[1] not in owned:
            continue  # not one of this run's engines'
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
