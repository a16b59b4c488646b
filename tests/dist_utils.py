"""Run a function on N local processes that form a real torch.distributed world.

Generic helper for op tests that need genuine collectives (gloo on the CPU
stack).  Every worker process:

1. sets the usual CPU-stack environment (small KV cache, one OMP thread),
2. joins a gloo world through a free TCP port on 127.0.0.1,
3. optionally builds vLLM's groups (``init_distributed_environment`` +
   ``initialize_model_parallel``) under a default ``VllmConfig`` so that
   ``get_tp_group()`` & co. return real ``GroupCoordinator`` objects
   (``cpu_shm=True``: first loads vLLM's ``_C`` kernels and names the
   instance, as vLLM's CPU worker does, so that the TP group gets vLLM's
   shared-memory communicator),
4. calls ``fn(rank, world_size, *args)`` and sends its (picklable) return
   value back to the parent,
5. stays, with its groups, for the next call that asks for the same world
   (``WorldSpec``: size, vLLM groups, TP size, shared memory, env), after
   resetting the plugin's per-process state; ``fresh=True`` and any failure
   end the world after the call. ``WORLDS.close()`` tears them all down.

The parent collects one result per rank, ordered by rank.  If any worker
raises, the parent raises :class:`WorkerError` carrying the worker's formatted
traceback; if the world does not finish within ``timeout`` seconds, the
workers are terminated and :class:`TimeoutError` is raised.

``fn`` must be importable by the spawned children, i.e. a module-level
function of an importable module (a test module is fine: pytest puts its
directory on ``sys.path`` and spawn children inherit ``sys.path``).
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["WORLDS", "WorkerError", "free_port", "load_vllm_kernels",
           "make_group_coordinator", "run_distributed"]


class WorkerError(RuntimeError):
    """A worker process raised; the message holds its traceback."""


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
    call that asks for exactly this."""

    world_size: int
    init_vllm: bool
    tp_size: int | None
    cpu_shm: bool
    env: tuple[tuple[str, str], ...]


def _build_world(rank: int, spec: WorldSpec, port: int) -> Callable[[], None]:
    """Join the gloo world (and build vLLM's groups); return the teardown."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    init_method = f"tcp://127.0.0.1:{port}"
    if spec.cpu_shm:
        # What vLLM's CPU worker does before it builds the groups: the
        # kernels' import registers torch.ops._C.init_shm_manager, and
        # the identifier keeps concurrent worlds' segments apart.
        load_vllm_kernels()
        os.environ["VLLM_DIST_IDENT"] = f"dist-utils-{port}"
    if spec.init_vllm:
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.distributed import (
            destroy_distributed_environment,
            destroy_model_parallel,
            init_distributed_environment,
            initialize_model_parallel,
        )

        with set_current_vllm_config(VllmConfig()):
            init_distributed_environment(
                world_size=spec.world_size, rank=rank, distributed_init_method=init_method,
                local_rank=rank, backend="gloo",
            )
            initialize_model_parallel(tensor_model_parallel_size=spec.tp_size or spec.world_size,
                                      backend="gloo")

        def teardown() -> None:
            destroy_model_parallel()
            destroy_distributed_environment()

        return teardown
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank,
                            world_size=spec.world_size)
    return dist.destroy_process_group


def _vllm_groups() -> tuple:
    """vLLM's world and TP groups as they are now (None without vLLM)."""
    ps = sys.modules.get("vllm.distributed.parallel_state")
    return (getattr(ps, "_WORLD", None), getattr(ps, "_TP", None)) if ps else (None, None)


def _reset_between_calls(groups_at_start: tuple) -> bool:
    """Put back what one call may leave set in this process, so the next call
    starts as in a fresh world; False when that is not possible (the call
    replaced vLLM's groups), and the world must not be reused."""
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
    return _vllm_groups() == groups_at_start


def _serve(rank: int, spec: WorldSpec, port: int, tasks: Any, results: Any) -> None:
    """A world member: build the world once, then run every call it is sent
    (``(call_id, fn, args)``; ``None`` ends it) and report each result."""
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
    groups_at_start = _vllm_groups()
    try:
        while (task := tasks.get()) is not None:
            call_id, fn, args = task
            try:
                out = fn(rank, spec.world_size, *args)
                reusable = _reset_between_calls(groups_at_start)
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
            ctx.Process(target=_serve, args=(r, spec, port, self._tasks[r], self._results),
                        daemon=True)
            for r in range(spec.world_size)
        ]
        for p in self.procs:
            p.start()

    def call(self, fn: Callable[..., Any], args: tuple, timeout: float) -> tuple[list, bool]:
        """Run ``fn`` on every rank: (per-rank results, whether the world can
        be reused). Raises WorkerError / TimeoutError; the world is then dead."""
        self.calls += 1
        call_id = self.calls
        for q in self._tasks:
            q.put((call_id, fn, args))
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

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._worlds: dict[WorldSpec, _World] = {}
        self.started = 0

    def run(self, spec: WorldSpec, fn: Callable[..., Any], args: tuple, timeout: float,
            fresh: bool) -> list:
        world = None if fresh else self._worlds.pop(spec, None)
        if world is None:
            world = _World(spec)
            self.started += 1
        try:
            results, reusable = world.call(fn, args, timeout)
        except BaseException:
            world.close(kill=True)
            raise
        if fresh or not reusable:
            world.close()
            return results
        self._worlds[spec] = world  # now the most recently used
        while len(self._worlds) > self.keep:
            oldest = next(iter(self._worlds))
            self._worlds.pop(oldest).close()
        return results

    def close(self) -> None:
        while self._worlds:
            self._worlds.popitem()[1].close()


WORLDS = WorldPool()


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
    timeout: float = 180.0,
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
    spec = WorldSpec(world_size, init_vllm, tp_size, cpu_shm, tuple(sorted((env or {}).items())))
    return WORLDS.run(spec, fn, args, timeout, fresh)


def load_vllm_plugins_in_fresh_process(prelude: str = "") -> subprocess.CompletedProcess:
    """vLLM's own plugin loader in a clean interpreter, after ``prelude``
    (Python source run first); returns the finished process."""
    code = prelude + "\nfrom vllm.plugins import load_general_plugins\nload_general_plugins()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
