"""Process groups of FlashComm2: OTP, ODP and o_shared.

Layout
------
vLLM 0.32 numbers its world as ``ExternalDP x DP x PP x PCP x TP`` with TP
innermost (``initialize_model_parallel`` reshapes ``arange(world_size)`` to
``(-1, dp, pp, pcp, tp)``), so every TP group is a run of ``tp`` consecutive
ranks.  FlashComm2 splits each TP group (``P`` ranks ``t[0..P-1]``) with
``k`` = o_proj TP size and ``D = P // k``:

* OTP group ``i`` (``i < D``): ``[t[i + j*D] for j < k]`` -- the ranks whose
  o_proj shards (input columns) add up to the full o_proj; OTP rank ``j``
  holds input columns ``[j*a/k, (j+1)*a/k)``.
* ODP group ``j`` (``j < k``): ``[t[j*D + i] for i < D]`` -- the ranks that
  hold the *same* o_proj shard and exchange activations in the all-to-all;
  TP rank ``r = j*D + i`` is OTP rank ``j`` and ODP rank ``i``.
* o_shared group: the ranks that need the same o_proj shard inside one TP
  group, i.e. the ODP group (``k = 1``: the whole TP group).  It never spans
  DP replicas or PP stages: vLLM 0.32 runs dense-model DP replicas as
  independent engines (see ``vllm/v1/engine/core.py``), so a group across
  replicas would deadlock, and different PP stages run different layers.
  It is a separate communicator from ODP so that o_shared's asynchronous
  weight broadcasts never queue behind (or ahead of) the all-to-all.

Example, TP8, k=2: OTP ``[[0,4],[1,5],[2,6],[3,7]]``, ODP ``[[0..3],[4..7]]``.

Lifecycle
---------
:func:`init_flashcomm2_groups` is collective over the whole world (every
rank must call it, like vLLM's ``initialize_model_parallel``) and needs
vLLM's model-parallel groups.  vLLM offers no teardown hook a plugin could
join, so whoever initialises the groups calls
:func:`destroy_flashcomm2_groups` before ``destroy_model_parallel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_ascend_ext.logger import init_logger

logger = init_logger(__name__)

__all__ = [
    "FlashComm2GroupError",
    "FlashComm2GroupRanks",
    "destroy_flashcomm2_groups",
    "flashcomm2_group_ranks",
    "flashcomm2_groups_initialized",
    "get_flashcomm2_odp_group",
    "get_flashcomm2_oshared_group",
    "get_flashcomm2_otp_group",
    "init_flashcomm2_groups",
    "split_tp_group",
    "vllm_tp_group_ranks",
]


class FlashComm2GroupError(RuntimeError):
    """FlashComm2 groups requested in the wrong state or with a bad layout."""


@dataclass
class FlashComm2GroupRanks:
    """Every group of each kind in the world, as lists of global ranks."""

    tp: list[list[int]] = field(default_factory=list)
    otp: list[list[int]] = field(default_factory=list)
    odp: list[list[int]] = field(default_factory=list)
    oshared: list[list[int]] = field(default_factory=list)


# --------------------------------------------------------------------------
# pure layout
# --------------------------------------------------------------------------


def vllm_tp_group_ranks(
    world_size: int, tp: int, dp: int = 1, pp: int = 1, pcp: int = 1
) -> list[list[int]]:
    """vLLM 0.32's TP groups for this world (mirrors ``initialize_model_parallel``)."""
    for name, v in (("world_size", world_size), ("tp", tp), ("dp", dp),
                    ("pp", pp), ("pcp", pcp)):
        if not isinstance(v, int) or v < 1:
            raise FlashComm2GroupError(f"{name} must be a positive integer, got {v!r}")
    cell = dp * pp * pcp * tp
    if world_size % cell:
        raise FlashComm2GroupError(
            f"world_size={world_size} is not a multiple of dp*pp*pcp*tp="
            f"{dp}*{pp}*{pcp}*{tp}={cell}"
        )
    # (external_dp, dp, pp, pcp, tp) with tp innermost: TP groups are the
    # consecutive runs of `tp` ranks, whatever the outer sizes are.
    return [list(range(s, s + tp)) for s in range(0, world_size, tp)]


def split_tp_group(tp_ranks: list[int], otp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(OTP groups, ODP groups) of one TP group, given as its global ranks."""
    P, k = len(tp_ranks), otp_size
    if not isinstance(k, int) or k < 1 or P % k:
        raise FlashComm2GroupError(
            f"the o_proj TP size must be a positive divisor of the TP size {P}, got {k!r}"
        )
    D = P // k
    otp = [[tp_ranks[i + j * D] for j in range(k)] for i in range(D)]
    odp = [[tp_ranks[j * D + i] for i in range(D)] for j in range(k)]
    return otp, odp


def _layout_from_tp_groups(tp_groups: list[list[int]], otp_size: int) -> FlashComm2GroupRanks:
    out = FlashComm2GroupRanks(tp=[list(g) for g in tp_groups])
    for g in tp_groups:
        otp, odp = split_tp_group(list(g), otp_size)
        out.otp += otp
        out.odp += odp
    # The ranks needing the same o_proj shard within one TP group (= one DP
    # replica, one PP stage) are exactly an ODP group.
    out.oshared = [list(g) for g in out.odp]
    return out


def flashcomm2_group_ranks(
    world_size: int, tp: int, dp: int, pp: int, otp_size: int, *, pcp: int = 1
) -> FlashComm2GroupRanks:
    """All TP / OTP / ODP / o_shared groups of a world in vLLM's rank order."""
    return _layout_from_tp_groups(vllm_tp_group_ranks(world_size, tp, dp, pp, pcp), otp_size)


# --------------------------------------------------------------------------
# live groups
# --------------------------------------------------------------------------

_OTP: Any = None
_ODP: Any = None
_OSHARED: Any = None


def flashcomm2_groups_initialized() -> bool:
    return _OTP is not None and _ODP is not None


def _require(group: Any, what: str) -> Any:
    if group is None:
        raise FlashComm2GroupError(
            f"the FlashComm2 {what} group is not initialised: call "
            "init_flashcomm2_groups(cfg) after vLLM's initialize_model_parallel"
            + (" with o_shared enabled" if what == "o_shared" else "")
        )
    return group


def get_flashcomm2_otp_group() -> Any:
    """OTP group (size k): reduce-scatter of the partial o_proj outputs."""
    return _require(_OTP, "OTP (o_proj tensor parallel)")


def get_flashcomm2_odp_group() -> Any:
    """ODP group (size TP/k): the all-to-all of attention outputs."""
    return _require(_ODP, "ODP (o_proj data parallel)")


def get_flashcomm2_oshared_group() -> Any:
    """o_shared group: ranks holding the same o_proj shard (weights round-robin)."""
    return _require(_OSHARED, "o_shared")


def init_flashcomm2_groups(cfg: Any, backend: str | None = None) -> None:
    """Create the FlashComm2 groups for ``cfg`` (a ``FlashComm2Config``).

    Collective over the whole world.  A no-op when FlashComm2 is off or the
    same groups already exist; an error if vLLM's model parallel state is
    missing or groups of another shape exist.
    """
    global _OTP, _ODP, _OSHARED
    if not cfg.enabled:
        return
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise FlashComm2GroupError(
            "FlashComm2 groups need vLLM's model parallel groups: call "
            "init_distributed_environment() and initialize_model_parallel() first"
        )
    k = cfg.parallel_size
    if flashcomm2_groups_initialized():
        if _OTP.world_size == k and (_OSHARED is not None) == bool(cfg.oshared):
            return
        raise FlashComm2GroupError(
            f"FlashComm2 groups already exist with o_proj TP size {_OTP.world_size} "
            f"and o_shared {'on' if _OSHARED is not None else 'off'}; call "
            "destroy_flashcomm2_groups() before initialising them for "
            f"size {k}, o_shared {'on' if cfg.oshared else 'off'}"
        )

    tp_group = ps.get_tp_group()
    P = tp_group.world_size
    if k >= P or P % k:
        raise FlashComm2GroupError(
            f"o_proj TP size {k} must be smaller than and divide the TP size {P}"
        )
    layout = _layout_from_tp_groups(tp_group.group_ranks, k)
    backend = backend or str(tp_group.torch_distributed_backend)
    local_rank = ps.get_world_group().local_rank

    otp = ps.init_model_parallel_group(
        layout.otp, local_rank, backend, group_name="flashcomm2_otp"
    )
    odp = ps.init_model_parallel_group(
        layout.odp, local_rank, backend, group_name="flashcomm2_odp"
    )
    oshared = None
    if cfg.oshared:
        oshared = ps.init_model_parallel_group(
            layout.oshared, local_rank, backend, group_name="flashcomm2_oshared"
        )
    _OTP, _ODP, _OSHARED = otp, odp, oshared
    logger.info(
        "FlashComm2 groups on rank %d: TP %s -> OTP %s, ODP %s%s",
        tp_group.rank, tp_group.ranks, otp.ranks, odp.ranks,
        f", o_shared {oshared.ranks}" if oshared is not None else "",
    )


def destroy_flashcomm2_groups() -> None:
    """Destroy the FlashComm2 groups (safe to call repeatedly or when absent)."""
    global _OTP, _ODP, _OSHARED
    import torch.distributed as dist

    groups = [g for g in (_OSHARED, _ODP, _OTP) if g is not None]
    _OTP = _ODP = _OSHARED = None
    if not dist.is_initialized():
        return  # the default group (and every subgroup) is already gone
    for g in groups:
        try:
            g.destroy()
        except (RuntimeError, ValueError) as e:  # stale handle after a re-init
            logger.debug("FlashComm2: destroying group %s failed: %s", g.unique_name, e)
