"""Shared fixtures: the tiny checkpoints are real files, built once per machine
(cached under ~/.cache/vllm-ascend-ext/tiny-models, keyed by recipe version)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Every process the tests start (engines, workers, `vllm serve`, gloo worlds)
# imports this checkout's plugin, not whatever a reused venv's editable
# install points at (the e2e harness checks what each engine imported).
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


#: The vllm-ascend leg (``make test-ascend``) runs in a pytest process of its
#: own: its bootstrap makes vllm-ascend's NPUPlatform the current platform and
#: stands in for torch_npu for the whole process (tests/ascend_real/bootstrap.py).
ASCEND_LEG = "ascend_real"


def pytest_addoption(parser):
    parser.addoption("--ascend-real", action="store_true", default=False,
                     help=f"run tests/{ASCEND_LEG} (only that folder: its own process)")


def pytest_ignore_collect(collection_path, config):
    in_leg = ASCEND_LEG in Path(collection_path).parts
    if config.getoption("--ascend-real"):
        return None if in_leg or collection_path == Path(__file__).parent else True
    return True if in_leg else None


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(arch) -> Path`` of a saved tiny checkpoint."""
    from vllm_ascend_ext.tools.tiny_models import tiny_checkpoint

    return tiny_checkpoint
