"""The vllm-ascend leg: its own pytest process (``make test-ascend``).

``tests/conftest.py`` keeps this folder out of ``make test``: the bootstrap
(``bootstrap.py``, run when this package is imported) makes vllm-ascend's
``NPUPlatform`` the current platform and puts a ``torch_npu`` stand-in in
``sys.modules`` for the whole process. Where the vendored vllm-ascend source
is missing, every test here is skipped, naming the path.
"""

from __future__ import annotations

import pytest

from tests.ascend_real.bootstrap import vendored_missing_reason


def pytest_collection_modifyitems(config, items):
    reason = vendored_missing_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "ascend_real" in item.nodeid:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_configs(tmp_path_factory):
    """The ``VllmConfig`` of each case, built once here by vLLM's own
    ``EngineArgs`` under vllm-ascend's platform and pickled to the workers."""
    from tests.ascend_real.configs import build_configs

    return build_configs(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="session")
def two_rank_world(vllm_configs):
    """Every 2-rank check, in one gloo world (spawning workers that import
    vllm-ascend is the expensive part)."""
    from tests.ascend_real import worlds
    from tests.dist_utils import run_distributed

    return run_distributed(worlds.two_ranks, 2, vllm_configs, tp_size=2, timeout=600)


@pytest.fixture(scope="session")
def four_rank_world(vllm_configs):
    from tests.ascend_real import worlds
    from tests.dist_utils import run_distributed

    return run_distributed(worlds.four_ranks, 4, vllm_configs, tp_size=4, timeout=600)
