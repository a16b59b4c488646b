"""How hidden layers split over pipeline-parallel stages.

vLLM's default split (``get_pp_indices`` without ``VLLM_PP_LAYER_PARTITION``):
every stage gets ``L // pp`` layers and the remainder goes one layer each to
the stages before the last. Pure arithmetic, so the settings check and the
planner agree without importing vLLM.
"""

from __future__ import annotations

__all__ = ["pp_stage_ranges", "smallest_stage_layers"]


def pp_stage_ranges(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """``(start_layer, num_layers)`` of each of the ``pp`` stages."""
    sizes = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        sizes[-i] += 1
    starts = [sum(sizes[:i]) for i in range(pp)]
    return list(zip(starts, sizes))


def smallest_stage_layers(num_layers: int, pp: int) -> int:
    """Hidden layers on the smallest stage (0 when there are more stages than layers)."""
    return min(size for _, size in pp_stage_ranges(num_layers, pp))
