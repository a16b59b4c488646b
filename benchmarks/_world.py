"""Plumbing every benchmark here shares: import paths, the machine line, gloo
worlds, child-process environments and result files.

Import it first (``import _world``): it puts the repository root, ``tests/``
(for ``dist_utils``) and ``benchmarks/`` on ``sys.path``, so a benchmark runs
as ``python benchmarks/bench_x.py`` from any directory.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(ROOT / "tests"), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from dist_utils import run_distributed  # noqa: E402

__all__ = [
    "HERE",
    "ROOT",
    "child_env",
    "machine_line",
    "run_world",
    "with_tp_group",
    "write_results",
]


def machine_line() -> str:
    """``x86_64 2 cores, <CPU model> (AMX | no AMX)``: what every result records."""
    from vllm_ascend_ext.cpu_attention import cpu_has_amx, cpu_model_name

    return (f"{platform.machine()} {os.cpu_count()} cores, {cpu_model_name()}"
            f"{' (AMX)' if cpu_has_amx() else ' (no AMX)'}")


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float,
              env: dict[str, str] | None = None) -> list[Any]:
    """``fn(rank, world_size, *args)`` on a fresh gloo world of spawned processes
    with vLLM's parallel state built (``tests/dist_utils.py``); per-rank results."""
    return run_distributed(fn, world_size, *args, timeout=timeout, env=env)


def with_tp_group(fn: Callable[..., Any], *args: Any) -> Any:
    """Inside a rank of :func:`run_world`: one torch thread, a default
    ``VllmConfig`` current, ``fn(tp_group, *args)``."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import get_tp_group

    torch.set_num_threads(1)
    with set_current_vllm_config(VllmConfig()):
        return fn(get_tp_group(), *args)


def child_env(tp: int, flags: dict[str, str], cpu: bool = True) -> dict[str, str]:
    """Environment for a child engine: this one without any ``VLLM_ASCEND_*``
    setting (so only ``flags`` choose the configuration), plus the CPU stack's
    settings for ``tp`` ranks unless ``cpu`` is False, plus ``flags``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_ASCEND_")}
    if cpu:
        from vllm_ascend_ext.tools.local_server import cpu_env

        env.update(cpu_env(tp))
    env.update(flags)
    return env


def write_results(out: Path | str, result: dict, text: str, suffix: str = ".txt",
                  indent: int = 2) -> Path:
    """``result`` as JSON at ``out`` and ``text`` next to it (``suffix``); returns
    the text file's path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent, default=str))
    side = out.with_suffix(suffix)
    side.write_text(text if text.endswith("\n") else text + "\n")
    return side


#: ``bench_throughput.py``'s control: plain TP again, last in each round.
CONTROL = "plain TP again (control)"


def bracketed_ratios(runs: list[float], first: list[float], last: list[float]) -> list[float]:
    """Per round, a configuration's throughput over the mean of the round's
    two plain-TP runs, the first and the control (last): drift that moves
    the whole round in one direction cancels, where a ratio to the first run
    alone takes it for the configuration's own."""
    return [r / ((f + c) / 2) for r, f, c in zip(runs, first, last)]


def bracketed_cell(bracketed: list[float] | None) -> str:
    """A results table's cell for ``bracketed_ratios`` (None: no control ran)."""
    return ", ".join(f"{b:.3f}" for b in bracketed) if bracketed else "no control run"
