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
5. tears the groups down again.

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
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["WorkerError", "free_port", "make_group_coordinator", "run_distributed"]


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


def _worker(
    rank: int,
    world_size: int,
    port: int,
    init_vllm: bool,
    tp_size: int | None,
    cpu_shm: bool,
    env: dict[str, str],
    results: Any,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    os.environ.update(env)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        init_method = f"tcp://127.0.0.1:{port}"
        if cpu_shm:
            # What vLLM's CPU worker does before it builds the groups: the
            # kernels' import registers torch.ops._C.init_shm_manager, and
            # the identifier keeps concurrent worlds' segments apart.
            import vllm._C  # noqa: F401

            os.environ["VLLM_DIST_IDENT"] = f"dist-utils-{port}"
        if init_vllm:
            from vllm.config import VllmConfig, set_current_vllm_config
            from vllm.distributed import (
                destroy_distributed_environment,
                destroy_model_parallel,
                init_distributed_environment,
                initialize_model_parallel,
            )

            with set_current_vllm_config(VllmConfig()):
                init_distributed_environment(
                    world_size=world_size,
                    rank=rank,
                    distributed_init_method=init_method,
                    local_rank=rank,
                    backend="gloo",
                )
                initialize_model_parallel(
                    tensor_model_parallel_size=tp_size or world_size,
                    backend="gloo",
                )
            try:
                out = fn(rank, world_size, *args)
            finally:
                destroy_model_parallel()
                destroy_distributed_environment()
        else:
            import torch.distributed as dist

            dist.init_process_group(
                "gloo", init_method=init_method, rank=rank, world_size=world_size
            )
            try:
                out = fn(rank, world_size, *args)
            finally:
                dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    init_vllm: bool = True,
    tp_size: int | None = None,
    env: dict[str, str] | None = None,
    cpu_shm: bool = False,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Returns the per-rank return values (index = rank).  ``init_vllm=False``
    gives a bare ``torch.distributed`` gloo world without vLLM's groups.
    ``tp_size`` (default: ``world_size``) sizes vLLM's TP group.
    ``cpu_shm`` gives it vLLM CPU's shared-memory communicator.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, init_vllm, tp_size, cpu_shm,
                  dict(env or {}), results, fn, args),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()

    collected: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"distributed run of {getattr(fn, '__name__', fn)} did not "
                    f"finish within {timeout:.0f}s; results from ranks "
                    f"{sorted(collected)}"
                )
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                # A worker that died without reporting (segfault, OOM kill).
                dead = [
                    r for r, p in enumerate(procs)
                    if r not in collected and p.exitcode not in (None, 0)
                ]
                if dead:
                    raise WorkerError(
                        f"worker rank(s) {dead} exited with codes "
                        f"{[procs[r].exitcode for r in dead]} without a result"
                    ) from None
                continue
            collected[rank] = (ok, payload)
            if not ok:
                raise WorkerError(f"rank {rank} of {world_size} raised:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if len(collected) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [collected[r][1] for r in range(world_size)]


def load_vllm_plugins_in_fresh_process(prelude: str = "") -> subprocess.CompletedProcess:
    """vLLM's own plugin loader in a clean interpreter, after ``prelude``
    (Python source run first); returns the finished process."""
    code = prelude + "\nfrom vllm.plugins import load_general_plugins\nload_general_plugins()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
