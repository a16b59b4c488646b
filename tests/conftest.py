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


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(arch) -> Path`` of a saved tiny checkpoint."""
    from vllm_ascend_ext.tiny_models import tiny_checkpoint

    return tiny_checkpoint
