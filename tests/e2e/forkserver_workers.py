"""Engine workers forked from a server that has imported vLLM once.

vLLM CPU starts every worker with ``spawn`` (``platforms/cpu.py`` sets
``VLLM_WORKER_MULTIPROC_METHOD``), so each worker of each engine imports vLLM
again: about 11 s of CPU, most of a tiny engine's start on 2 cores. An engine
driver (``engine_driver.py``) runs many engines, so it hands vLLM's
multiprocess executor a ``forkserver`` context instead: one server process
imports vLLM's worker modules once, with the driver's start-up environment,
and forks a fresh worker for every rank of every engine.

A forked worker is still a new process: the model, the plugin (loaded by
vLLM's ``load_general_plugins`` inside the worker, never in the server) and
vLLM's distributed groups live and die with it. What a spawned worker would
have inherited is the environment at ``Process.start()``: vLLM sets per-rank
OpenMP variables around each start, and each engine sets its own flags. A
forked worker gets that environment, copied at ``start()`` and put in place
before the worker's target runs.

``fresh_process=True`` engines (``harness.run_vllm``) still spawn, so the
suite keeps a reference that shows forked workers compute what spawned ones do
(``test_engine_driver.py``).
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
from multiprocessing import reduction
from multiprocessing.context import ForkServerContext, ForkServerProcess

#: What the server imports before it forks anything: vLLM's executor and CPU
#: worker (and with them torch, transformers and vLLM's config), never the
#: plugin.
PRELOAD = ("vllm.v1.executor.multiproc_executor", "vllm.v1.worker.cpu_worker")


class _ParentStdio:
    """The parent's file descriptors 1 and 2 at ``start()``, sent to the child
    with the process object (a spawned child inherits them). The driver points
    them at the running engine's log, so the workers log there too."""

    def __getstate__(self) -> dict:
        # Pickled while the server's Popen is spawning: DupFd queues each fd
        # to travel over the server's socket.
        return {"fds": [reduction.DupFd(1), reduction.DupFd(2)]}

    def __setstate__(self, state: dict) -> None:
        self._fds = state["fds"]

    def install(self) -> None:
        for target, fd in zip((1, 2), self._fds):
            received = fd.detach()
            os.dup2(received, target)
            os.close(received)


class EnvCarryingProcess(ForkServerProcess):
    """A forkserver process that runs with the environment and the standard
    output and error its parent had at ``start()``, as a spawned one would."""

    def start(self) -> None:
        self._start_env = dict(os.environ)
        self._stdio = _ParentStdio()
        super().start()

    def run(self) -> None:
        self._stdio.install()
        os.environ.clear()
        os.environ.update(self._start_env)
        super().run()


class EnvCarryingForkServerContext(ForkServerContext):
    Process = EnvCarryingProcess


CONTEXT = EnvCarryingForkServerContext()


def start_server() -> None:
    """Start the server now, with the driver's own environment (before any
    engine sets its flags), importing ``PRELOAD``."""
    multiprocessing.forkserver.set_forkserver_preload(list(PRELOAD))
    multiprocessing.forkserver.ensure_running()


def use_for_vllm_workers() -> None:
    """Make vLLM's multiprocess executor start its workers from the server.

    vLLM 0.27.1 and 0.32.0 both import ``get_mp_context`` into
    ``vllm/v1/executor/multiproc_executor.py`` and call it there for the
    workers' context, their pipes and their shared lock."""
    import vllm.v1.executor.multiproc_executor as executor

    executor.get_mp_context = lambda: CONTEXT
