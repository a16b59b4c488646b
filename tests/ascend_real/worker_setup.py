"""Inside a gloo worker: what vLLM's worker wrapper and vllm-ascend's
``NPUWorker`` do before a model is built (``vllm_ascend/worker/worker.py``,
``__init__`` and ``_init_worker_distributed_environment``), minus the device."""

from __future__ import annotations

from typing import Any

_done: set[int] = set()


def prepare_worker(vllm_config: Any) -> None:
    """vllm-ascend's registrations once per process (they are process-global);
    its config for each ``vllm_config``."""
    from vllm_ascend.ascend_config import init_ascend_config

    if _done:
        init_ascend_config(vllm_config)
        return
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # vLLM's worker wrapper: our plugin registers its models

    from vllm_ascend.utils import adapt_patch, register_ascend_customop

    adapt_patch()  # vllm-ascend's worker patches (DeepSeek MLA attention, ...)
    from vllm_ascend import ops

    ops.register_dummy_fusion_op()
    register_ascend_customop(vllm_config)
    from vllm_ascend.distributed.parallel_state import init_ascend_model_parallel

    init_ascend_config(vllm_config)
    # vllm-ascend's worker patches GroupCoordinator before vLLM's groups
    # exist; tests/dist_utils.py built them first, so build them again.
    from vllm.distributed import (
        destroy_model_parallel,
        get_tensor_model_parallel_world_size,
        initialize_model_parallel,
    )

    tp = get_tensor_model_parallel_world_size()
    destroy_model_parallel()
    initialize_model_parallel(tensor_model_parallel_size=tp, backend="gloo")
    init_ascend_model_parallel(vllm_config.parallel_config)
    _done.add(1)
