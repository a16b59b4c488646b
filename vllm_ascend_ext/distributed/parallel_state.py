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
* o_shared group: the ranks that need the same o_proj shard and step
  through the layers together.  Inside one replica that is the ODP group
  (``k = 1``: the whole TP group).  It never spans PP stages (they run
  different layers).  It spans DP replicas only when vLLM runs them in
  lockstep, which vLLM 0.32 does for MoE models alone: ``DPEngineCoreProc``
  keeps every MoE replica stepping, with dummy batches on idle ones, because
  the experts' all-gather spans DP.  Dense replicas are independent engines
  (``vllm/v1/engine/core.py`` resets their DP size to 1), so a group across
  them would deadlock the first time one replica idles.  A lockstep group
  is ODP group ``j`` of every replica of the same PP stage, replica-major.
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
    "dp_replicas_in_lockstep",
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


def flashcomm2_group_ranks(
    world_size: int,
    tp: int,
    dp: int,
    pp: int,
    otp_size: int,
    *,
    pcp: int = 1,
    oshared_spans_dp: bool = False,
) -> FlashComm2GroupRanks:
    """All TP / OTP / ODP / o_shared groups of a world in vLLM's rank order.

    ``oshared_spans_dp``: the DP replicas step in lockstep (vLLM 0.32: MoE
    models only), so an o_shared group may join the replicas' ODP groups.
    """
    tp_groups = vllm_tp_group_ranks(world_size, tp, dp, pp, pcp)
    out = FlashComm2GroupRanks(tp=[list(g) for g in tp_groups])
    for g in tp_groups:
        otp, odp = split_tp_group(list(g), otp_size)
        out.otp += otp
        out.odp += odp
    if not oshared_spans_dp:
        out.oshared = [list(g) for g in out.odp]
        return out
    # TP group g = (e * dp + d) * cells + s in vLLM's (external_dp, dp, pp*pcp)
    # order, and its ODP group j is out.odp[g * k + j]; one o_shared group joins
    # ODP group j of every replica d of one (external_dp e, stage s) cell.
    k, cells = otp_size, pp * pcp
    outer = world_size // (dp * cells * tp)
    out.oshared = [
        [r for d in range(dp) for r in out.odp[((e * dp + d) * cells + s) * k + j]]
        for e in range(outer) for s in range(cells) for j in range(k)
    ]
    return out


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


def dp_replicas_in_lockstep(vllm_config: Any = None) -> bool:
    """Whether vLLM steps this world's DP replicas together (see module doc).

    vLLM 0.32 keeps a DP group of more than one rank only for MoE models
    (dense replicas get DP size 1); both conditions are checked so that a
    dense model can never end up with a group across replicas.
    """
    from vllm.config import get_current_vllm_config
    from vllm.distributed import parallel_state as ps

    model_config = (vllm_config or get_current_vllm_config()).model_config
    is_moe = bool(getattr(model_config, "is_moe", False)) if model_config else False
    return is_moe and ps.get_dp_group().world_size > 1


def init_flashcomm2_groups(
    cfg: Any, backend: str | None = None, *, dp_lockstep: bool | None = None
) -> None:
    """Create the FlashComm2 groups for ``cfg`` (a ``FlashComm2Config``).

    Collective over the whole world.  A no-op when FlashComm2 is off or the
    same groups already exist; an error if vLLM's model parallel state is
    missing or groups of another shape exist.  ``dp_lockstep`` (default:
    :func:`dp_replicas_in_lockstep`) lets the o_shared group span DP.
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
    if dp_lockstep is None:
        dp_lockstep = dp_replicas_in_lockstep()
    dp = ps.get_dp_group().world_size
    layout = flashcomm2_group_ranks(
        ps.get_world_group().world_size, P, dp, ps.get_pp_group().world_size, k,
        pcp=ps.get_pcp_group().world_size, oshared_spans_dp=dp_lockstep,
    )
    if layout.tp != [list(g) for g in tp_group.group_ranks]:
        # Our layout mirrors initialize_model_parallel; refuse to guess if a
        # vLLM change breaks that.
        raise FlashComm2GroupError(
            f"vLLM's TP groups {tp_group.group_ranks} differ from the layout "
            f"FlashComm2 derives for DP {dp} x PP x TP {P}: {layout.tp}"
        )
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
        (f", o_shared {oshared.ranks}"
         + (f" (spans {dp} DP replicas in lockstep)" if dp_lockstep and dp > 1 else ""))
        if oshared is not None else "",
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
