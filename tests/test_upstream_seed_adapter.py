"""The benchmark's loader for the upstream seed (``benchmarks/upstream_seed.py``).

The side-by-side o_shared benchmark runs upstream's module as its baseline;
this checks, without timing anything, that the re-indented seed is valid
Python and exposes what the benchmark calls. Skipped where the seed (outside
this repository, in ``../shared/reference``) is absent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
pytestmark = pytest.mark.vllm_independent

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import upstream_seed  # noqa: E402


@pytest.mark.skipif(not upstream_seed.DEFAULT_SEED.exists(),
                    reason=f"upstream seed not found at {upstream_seed.DEFAULT_SEED}")
def test_seed_reindents_to_a_module_with_the_benchmarked_api():
    compile(upstream_seed.reindented_source(), "seed", "exec")
    seed = upstream_seed.load_seed()
    for name in ("register_layer_to_shared_weight_series", "reach_layer_for_shared_weight_series"):
        assert callable(getattr(seed, name, None)), name


def test_a_changed_seed_is_refused(tmp_path):
    bad = tmp_path / "seed.txt"
    bad.write_text("header\nimport torch\nx = 1\n")
    with pytest.raises(upstream_seed.SeedError, match="code lines changed"):
        upstream_seed.reindented_source(bad)
