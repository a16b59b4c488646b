"""Run a function on N local processes that form a real torch.distributed world.

Generic helper for op tests that need genuine collectives (gloo on the CPU
stack).  Every worker process:

1. sets the usual CPU-stack environment (small KV cache, one OMP thread),
2. joins a gloo world through a free TCP port on 127.0.0.1,
3. for each call that wants them, builds vLLM's groups on that world
   (``init_distributed_environment`` + ``initialize_model_parallel``, at the
   call's TP size) under a default ``VllmConfig`` so that ``get_tp_group()``
   & co. return real ``GroupCoordinator`` objects (``cpu_shm=True``: first
   loads vLLM's ``_C`` kernels and names the instance, as vLLM's CPU worker
   does, so that the TP group gets vLLM's shared-memory communicator); a call
   that wants a bare world gets none,
4. calls ``fn(rank, world_size, *args)`` and sends its (picklable) return
   value back to the parent,
5. stays for the next call that asks for the same world (``WorldSpec``:
   size, shared memory, env), after resetting the plugin's per-process
   state. Whether a call gets vLLM's groups, and at which TP size, is the
   call's own: they are built, rebuilt or torn down on the same processes.
   Groups that a call builds itself on a bare world are torn down after it
   (the gloo world stays). ``fresh=True``, a call that replaced the vLLM
   groups it was given, and any failure end the world after the call.
   ``WORLDS.close()`` tears them all down.

Spawning a world's processes costs one vLLM import each (about 12 s of CPU
on the 2-core CI machine), a call usually well under a second: the suite
starts as few worlds as it can.

The parent collects one result per rank, ordered by rank.  If any worker
raises, the parent raises :class:`WorkerError` carrying the worker's formatted
traceback; if the world does not finish within ``timeout`` seconds, the
workers are terminated and :class:`TimeoutError` is raised.

``fn`` must be importable by the spawned children, i.e. a module-level
function of an importable module (a test module is fine: pytest puts its
directory on ``sys.path`` and spawn children inherit ``sys.path``).
"""

from __future__ import annotations

import atexit
import os
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import multiprocessing.util  # noqa: F401 - registers its exit handler before WORLDS.close's
import torch.multiprocessing as mp

__all__ = ["WORLDS", "WorkerError", "destroy_flashcomm2_groups_together", "free_port",
           "load_vllm_kernels",
           "make_group_coordinator", "run_distributed"]


class WorkerError(RuntimeError):
    """A worker process raised; the message holds its traceback."""


def destroy_flashcomm2_groups_together() -> None:
    """``destroy_flashcomm2_groups`` once every rank of the world has finished
    building them. gloo lets a rank finish a new group while a slower peer is
    still connecting to it; destroying the group then closes that peer's
    socket mid-handshake ("connectFullMesh failed ... Connection closed by
    peer"), and the world hangs. Checks that build groups and barely use them
    (one rank of 4 lagging on 2 busy cores) hit it."""
    import torch.distributed as dist

    from vllm_ascend_ext.distributed.parallel_state import destroy_flashcomm2_groups

    if dist.is_initialized():
        dist.barrier()  # the gloo world: every rank is past its group builds
    destroy_flashcomm2_groups()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_group_coordinator(
    group_ranks: list[list[int]], group_name: str, backend: str = "gloo"
) -> Any:
    """Inside a worker: a vLLM ``GroupCoordinator`` over custom rank lists.

    Collective: every rank of the world must call it with the same
    ``group_ranks`` (a partition of the world, e.g. ``[[0, 1], [2, 3]]``);
    each rank gets the coordinator of the list it belongs to.  Call
    ``.destroy()`` on it before the worker returns.
    """
    from vllm.distributed.parallel_state import get_world_group, init_model_parallel_group

    return init_model_parallel_group(
        group_ranks, get_world_group().local_rank, backend, group_name=group_name
    )


@dataclass(frozen=True)
class WorldSpec:
    """What makes two worlds interchangeable: a world is reused only for a
    call that asks for exactly this. Whether the call wants vLLM's groups,
    and of which TP size, is not part of it: each call gets its own."""

    world_size: int
    cpu_shm: bool
    env: tuple[tuple[str, str], ...]


def _build_world(rank: int, spec: WorldSpec, port: int) -> Callable[[], None]:
    """Join the gloo world; return its teardown."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if spec.cpu_shm:
        # What vLLM's CPU worker does before it builds the groups: the
        # kernels' import registers torch.ops._C.init_shm_manager, and
        # the identifier keeps concurrent worlds' segments apart.
        load_vllm_kernels()
        os.environ["VLLM_DIST_IDENT"] = f"dist-utils-{port}"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=spec.world_size)

    def teardown() -> None:
        _drop_vllm_groups()
        dist.destroy_process_group()

    return teardown


def _give_vllm_groups(rank: int, world_size: int, tp_size: int | None) -> None:
    """Before a call: vLLM's world and model-parallel groups (TP size
    ``tp_size``) on this gloo world, as an engine's worker has them; or,
    with ``tp_size`` None, none at all (a bare world)."""
    if tp_size is None:
        _drop_vllm_groups()
        return
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.distributed.parallel_state import get_tp_group, model_parallel_is_initialized

    with set_current_vllm_config(VllmConfig()):
        if _vllm_groups()[0] is None:
            # The default process group exists: vLLM only builds its world
            # group on it (the init method is not used).
            init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank,
                                         distributed_init_method="env://", backend="gloo")
        if model_parallel_is_initialized() and get_tp_group().world_size == tp_size:
            return
        destroy_model_parallel()
        initialize_model_parallel(tensor_model_parallel_size=tp_size, backend="gloo")


def _drop_vllm_groups() -> None:
    """Tear down vLLM's groups, if any, keeping the gloo world itself (vLLM's
    ``destroy_distributed_environment`` would also end the default process
    group)."""
    if _vllm_groups()[0] is None:
        return
    ps = sys.modules["vllm.distributed.parallel_state"]
    ps.destroy_model_parallel()
    if ps._WORLD is not None:
        ps._WORLD.destroy()
    ps._WORLD = None
    ps._NODE_COUNT = None


def _vllm_groups() -> tuple:
    """vLLM's world and TP groups as they are now (None without vLLM)."""
    ps = sys.modules.get("vllm.distributed.parallel_state")
    return (getattr(ps, "_WORLD", None), getattr(ps, "_TP", None)) if ps else (None, None)


def _reset_between_calls(bare: bool, groups_before: tuple) -> bool:
    """Put back what one call may leave set in this process, so the next call
    starts as in a fresh world; False when that is not possible (the call
    replaced the vLLM groups it was given), and the world must not be reused.
    ``bare``: the call was given no vLLM groups; any it built are dropped."""
    import torch

    torch.set_default_dtype(torch.float32)
    # Only modules the call imported: a reset never imports anything.
    parallel_state = sys.modules.get("vllm_ascend_ext.distributed.parallel_state")
    if parallel_state is not None:
        parallel_state.destroy_flashcomm2_groups()
    registry = sys.modules.get("vllm_ascend_ext.ops.shared_weight.registry")
    if registry is not None:
        registry.shared_weight_registry.clear()
    tp_shard = sys.modules.get("vllm_ascend_ext.ops.tp_shard.storage")
    if tp_shard is not None:
        tp_shard.close_all()
    communication = sys.modules.get("vllm_ascend_ext.distributed.communication")
    if communication is not None:
        communication.set_poison_outputs(False)
    if bare:
        _drop_vllm_groups()
    return _vllm_groups() == groups_before


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies. A member
    waits on its task queue for good, and ``daemon`` only helps when the
    parent exits cleanly: a parent killed mid-run (a CI timeout, Ctrl-C on
    ``make``) left its worlds' members running, and they slowed every later
    run on the machine."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _serve(rank: int, spec: WorldSpec, port: int, tasks: Any, results: Any,
           parent: int) -> None:
    """A world member: build the world once, then run every call it is sent
    (``(call_id, fn, args, tp_size)``, ``tp_size`` None for a bare world;
    ``None`` ends it) and report each result."""
    _die_with(parent)
    os.environ.update(dict(spec.env))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(spec.world_size)})
    try:
        teardown = _build_world(rank, spec, port)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((None, rank, False, traceback.format_exc(), False))
        return
    try:
        while (task := tasks.get()) is not None:
            call_id, fn, args, tp_size = task
            try:
                _give_vllm_groups(rank, spec.world_size, tp_size)
                groups_before = _vllm_groups()
                out = fn(rank, spec.world_size, *args)
                reusable = _reset_between_calls(tp_size is None, groups_before)
                results.put((call_id, rank, True, out, reusable))
            except BaseException:  # noqa: BLE001
                results.put((call_id, rank, False, traceback.format_exc(), False))
    finally:
        teardown()


class _World:
    """``world_size`` spawned processes in one gloo world, kept for the calls
    that ask for the same ``WorldSpec`` (spawning them and importing vLLM
    costs 10-30 s on 2 cores; a call itself often well under a second)."""

    def __init__(self, spec: WorldSpec):
        self.spec = spec
        self.calls = 0
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(spec.world_size)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_serve, daemon=True,
                        args=(r, spec, port, self._tasks[r], self._results, os.getpid()))
            for r in range(spec.world_size)
        ]
        for p in self.procs:
            p.start()

    # Between calls a world is stopped (SIGSTOP): each gloo process group has
    # a transport thread that wakes every 10 ms, and a kept world's members
    # hold 15-37 groups each (vLLM's, FlashComm2's). Left running, a cold CI
    # run's idle worlds held 350-380 such threads, took 0.3-0.9 of a core on
    # the 2-core machine, and crowded the unit lanes' own scheduling groups.
    # Every message of a call has been read when it returns, so no member is
    # stopped while the parent waits on it.
    def _signal(self, sig: int) -> None:
        for p in self.procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def call(self, fn: Callable[..., Any], args: tuple, timeout: float,
             tp_size: int | None) -> tuple[list, bool]:
        """Run ``fn`` on every rank with vLLM's groups at TP size ``tp_size``
        (None: on the bare world): (per-rank results, whether the world can
        be reused). Raises WorkerError / TimeoutError; the world is then dead."""
        self.calls += 1
        call_id = self.calls
        self.resume()
        for q in self._tasks:
            q.put((call_id, fn, args, tp_size))
        size = self.spec.world_size
        collected: dict[int, Any] = {}
        reusable = True
        deadline = time.monotonic() + timeout
        while len(collected) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"distributed run of {getattr(fn, '__name__', fn)} did not finish within "
                    f"{timeout:.0f}s; results from ranks {sorted(collected)}")
            try:
                got_id, rank, ok, payload, clean = self._results.get(
                    timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                # A worker that died without reporting (segfault, OOM kill).
                dead = [r for r, p in enumerate(self.procs)
                        if r not in collected and p.exitcode is not None]
                if dead:
                    raise WorkerError(
                        f"worker rank(s) {dead} exited with codes "
                        f"{[self.procs[r].exitcode for r in dead]} without a result") from None
                continue
            if not ok:
                raise WorkerError(f"rank {rank} of {size} raised:\n{payload}")
            if got_id == call_id:
                collected[rank] = payload
                reusable = reusable and clean
        return [collected[r] for r in range(size)], reusable

    def close(self, kill: bool = False) -> None:
        self.resume()
        if not kill:
            for q in self._tasks:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0.5 if kill else 10)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (*self._tasks, self._results):
            q.close()


class WorldPool:
    """The worlds of one pytest process, by ``WorldSpec``; at most
    ``keep`` of them stay alive (the least recently used one is closed)."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._worlds: dict[WorldSpec, _World] = {}

    def run(self, spec: WorldSpec, fn: Callable[..., Any], args: tuple, timeout: float,
            fresh: bool, tp_size: int | None) -> list:
        world = None if fresh else self._worlds.pop(spec, None)
        if world is None:
            world = _World(spec)
            from tests.suite_hygiene import COUNTS

            COUNTS.gloo_worlds += 1
        try:
            results, reusable = world.call(fn, args, timeout, tp_size)
        except BaseException:
            world.close(kill=True)
            raise
        if fresh or not reusable:
            world.close()
            return results
        world.pause()
        self._worlds[spec] = world  # now the most recently used
        while len(self._worlds) > self.keep:
            oldest = next(iter(self._worlds))
            self._worlds.pop(oldest).close()
        return results

    def close(self) -> None:
        while self._worlds:
            self._worlds.popitem()[1].close()


WORLDS = WorldPool()
# Before multiprocessing's own exit handler (registered earlier, so run
# later), which would SIGTERM the members and wait: a stopped member only
# takes that signal once continued.
atexit.register(WORLDS.close)


def load_vllm_kernels() -> bool:
    """Load vLLM's compiled kernels the way its own workers do, and say
    whether they have the CPU shared-memory communicator.

    The platform picks the build this CPU can run: vLLM CPU ships ``_C``
    (AVX-512 with bf16), ``_C_AVX512`` and ``_C_AVX2``; importing ``vllm._C``
    by name on an AVX2-only CPU dies with SIGILL. Only the AVX-512 builds
    have the communicator (vllm-cpu 0.32.0); without it vLLM's TP group
    falls back to gloo, as it does here then."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "init_shm_manager")


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 600.0,
    init_vllm: bool = True,
    tp_size: int | None = None,
    env: dict[str, str] | None = None,
    cpu_shm: bool = False,
    fresh: bool = False,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Returns the per-rank return values (index = rank).  ``init_vllm=False``
    gives a bare ``torch.distributed`` gloo world without vLLM's groups.
    ``tp_size`` (default: ``world_size``) sizes vLLM's TP group.
    ``cpu_shm`` gives it vLLM CPU's shared-memory communicator.
    The world is kept for the next call with the same arguments (``WORLDS``)
    unless ``fresh``, or unless a rank raised, timed out or replaced vLLM's
    groups; the plugin's process state is reset between calls.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    spec = WorldSpec(world_size, cpu_shm, tuple(sorted((env or {}).items())))
    return WORLDS.run(spec, fn, args, timeout, fresh,
                      (tp_size or world_size) if init_vllm else None)


def load_vllm_plugins_in_fresh_process(prelude: str = "") -> subprocess.CompletedProcess:
    """vLLM's own plugin loader in a clean interpreter, after ``prelude``
    (Python source run first); returns the finished process."""
    code = prelude + "\nfrom vllm.plugins import load_general_plugins\nload_general_plugins()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
