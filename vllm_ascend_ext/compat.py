"""Every place where this plugin's code depends on the vLLM release.

The plugin supports vLLM ``version_check.SUPPORTED_VLLM_RANGE`` (0.25.1 up to
0.32.x). Each shim below names the releases it serves; everything else in the
package is written against APIs that are the same across that range (read in
vLLM 0.23.0, 0.27.1, 0.32.0 and 0.33.0).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.distributed
import torch.nn as nn


@lru_cache(maxsize=1)
def vllm_release() -> tuple[int, int, int]:
    import vllm

    from vllm_ascend_ext.version_check import release_tuple

    return release_tuple(vllm.__version__)


# --- CPU: keep an unquantized linear weight a plain tensor --------------------
#
# vLLM CPU's UnquantizedLinearMethod.process_weights_after_loading packs the
# weight into a oneDNN handle (``layer.cpu_linear``) and leaves ``layer.weight``
# empty, which a shared-weight series cannot broadcast.
#
# - vLLM >= 0.32: the method honours ``layer._cpu_skip_gemm_dispatch = True``
#   (vLLM's own escape hatch for MLA's kv_b_proj): ``cpu_linear = F.linear``,
#   weight untouched.
# - vLLM 0.25.1 .. 0.31: no such flag (read absent in 0.27.1; 0.28-0.31 not
#   read, so they get this shim too, which is right whether or not they have
#   the flag); the method always packs. The shim replaces that one post-load
#   step with what 0.32 does for the flag. Other quant methods are left alone.
FIRST_VLLM_WITH_CPU_SKIP_GEMM_DISPATCH = (0, 32, 0)


def _cpu_plain_linear_post_load(layer: nn.Module) -> None:
    import torch.nn.functional as F

    layer.cpu_linear = F.linear


def keep_cpu_linear_weight_plain(layer: nn.Module, post_load: Callable) -> Callable:
    """Return the post-load step to run for ``layer`` on vLLM CPU so that its
    processed weight stays a plain tensor (``post_load`` is the quant method's
    own ``process_weights_after_loading``)."""
    if vllm_release() >= FIRST_VLLM_WITH_CPU_SKIP_GEMM_DISPATCH:
        layer._cpu_skip_gemm_dispatch = True
        return post_load
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    method = getattr(post_load, "__self__", None)
    if type(method) is UnquantizedLinearMethod:
        return _cpu_plain_linear_post_load
    return post_load


# --- vLLM's sequence-parallel compile pass ------------------------------------
#
# - vLLM 0.25.1 .. 0.27.1 (and its neighbours): ``pass_config.enable_sp``
#   (older releases: ``enable_sequence_parallelism``).
# - vLLM 0.32: no sequence-parallel pass in ``PassConfig``; nothing to find.
SEQUENCE_PARALLEL_PASS_FIELDS = ("enable_sp", "enable_sequence_parallelism")


def sequence_parallel_pass_setting(compilation_config) -> str | None:
    """``compilation_config.pass_config.<field>=True`` when vLLM's
    sequence-parallel pass is on (it shards the hidden states around o_proj
    by token), else None."""
    pass_config = getattr(compilation_config, "pass_config", None)
    for name in SEQUENCE_PARALLEL_PASS_FIELDS:
        if getattr(pass_config, name, None):
            return f"compilation_config.pass_config.{name}=True"
    return None


# --- DP token counts of the current forward pass ------------------------------
#
# vLLM 0.27.1 and 0.32.0: ``get_forward_context().dp_metadata`` is a
# ``DPMetadata`` with ``num_tokens_across_dp_cpu`` (one count per DP rank)
# when DP > 1, else None.


def max_tokens_across_dp() -> int | None:
    """The largest batch of any DP rank in this forward pass, or None when
    the forward context carries no DP counts."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = getattr(get_forward_context(), "dp_metadata", None)
    counts = getattr(meta, "num_tokens_across_dp_cpu", None)
    return None if counts is None else int(counts.max())


# --- vLLM CPU's shared-memory collectives -------------------------------------
#
# vLLM 0.27.1 and 0.32.0 (read in both; the same code): ``CpuCommunicator``
# keeps the collectives it runs in ``dist_module``: a ``_CPUSHMDistributed``
# (shared-memory kernels: all_reduce that sums, gather, all_gather_into_tensor)
# when the group's name starts with ``tp`` or ``pp``, vLLM's ``_C`` extension
# is loaded and every rank of the group agrees on one shared-memory name (one
# node); torch.distributed itself otherwise. vLLM has no public accessor. The
# kernels dispatch on floating dtypes only (csrc/cpu/shm.cpp,
# VLLM_DISPATCH_FLOATING_TYPES).
CPU_SHM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_shm_collectives(group: Any) -> Any | None:
    """vLLM CPU's shared-memory collectives of a ``GroupCoordinator``, or None
    where vLLM did not give the group any (not CPU, several nodes, other name)."""
    comm = getattr(group, "device_communicator", None)
    module = getattr(comm, "dist_module", None)
    if module is None or module is torch.distributed:
        return None
    try:
        from vllm.distributed.device_communicators.cpu_communicator import (
            _CPUSHMDistributed,
        )
    except ImportError:  # a vLLM that moved it: no shared-memory path
        return None
    return module if isinstance(module, _CPUSHMDistributed) else None
