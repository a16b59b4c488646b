"""A long-lived process that runs vLLM engine specs one after another.

Importing vLLM costs about 15 s of the ~37 s an engine run takes on the CI
machine; a driver pays it once. Each engine still gets fresh workers
(``distributed_executor_backend="mp"`` even at TP=1), started with that
engine's own environment, so the model, the plugin's per-process state and
vLLM's distributed groups never outlive their engine. The workers are
forked from a server that imported vLLM's worker modules once
(``forkserver_workers.py``), not spawned: a spawned worker imports vLLM
again. What does live in the driver (vLLM's front end and engine core) is reset per engine:
the environment is set exactly as the spec says for the keys an engine may
change, and vLLM's environment cache is cleared.

Protocol (``harness.EngineDriver`` is the other side): one JSON request per
line on stdin, ``{"spec", "out", "log", "env"}``; one JSON reply per request
on the file descriptor named on the command line, ``{"ok": true}`` or
``{"ok": false, "error": ...}``.
While an engine runs, file descriptors 1 and 2 (the driver's and, inherited,
its workers') point at that request's log file. After a failed engine the
driver exits: nothing it half-built is reused.

    python engine_driver.py REPLY_FD   (started by the harness)
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import forkserver_workers  # noqa: E402
from run_vllm import run_engine  # noqa: E402

from vllm_ascend_ext.config import SETTINGS  # noqa: E402

#: The plugin's settings, as a user sets them: a "flags off" engine has none.
FEATURE_ENV = tuple(setting.env for setting in SETTINGS)
#: The environment variables an engine may set differently from the driver it
#: runs in. Each is read when the engine or its workers start, never at vLLM's
#: import (which the driver did once). Anything else that differs needs a
#: driver of its own (``harness`` keys drivers by it).
PER_ENGINE_ENV = (*FEATURE_ENV, "VLLM_CPU_OMP_THREADS_BIND")


def _apply_env(env: dict[str, str]) -> None:
    for key in PER_ENGINE_ENV:
        if key in env:
            os.environ[key] = env[key]
        else:
            os.environ.pop(key, None)
    import vllm.envs

    # vLLM caches its env lookups once an engine core is up (enable_envs_cache);
    # the next engine must read its own.
    vllm.envs.disable_envs_cache()


def _run_logged(request: dict) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        spec = json.loads(Path(request["spec"]).read_text())
        result = run_engine(spec)
        Path(request["out"]).write_text(json.dumps(result))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)


def main(reply_fd: int) -> int:
    replies = os.fdopen(reply_fd, "w", buffering=1)
    forkserver_workers.start_server()
    forkserver_workers.use_for_vllm_workers()
    for line in sys.stdin:
        request = json.loads(line)
        _apply_env(request["env"])
        try:
            _run_logged(request)
        except BaseException:  # noqa: BLE001 - reported, then this driver ends
            replies.write(json.dumps({"ok": False, "error": traceback.format_exc()}) + "\n")
            return 1
        replies.write(json.dumps({"ok": True}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
