"""Capacity planner for FlashComm2 + o_shared: ``vllm-ascend-ext plan``.

Answers, for one model and one parallel layout, before anything is deployed:

* how many bytes of ``o_proj`` weight each rank holds with FlashComm2 alone
  (every rank keeps a full ``a/k x h`` shard of every layer of its PP stage),
  with o_shared and this project's ring, with upstream's ring formula, at the
  ``1/n`` floor, and with plain tensor parallelism;
* whether one layer's broadcast fits in the compute window the chosen
  prefetch step gives it;
* how many bytes FlashComm2 moves per layer compared with plain TP for given
  token counts, and the token count at which o_shared's per-layer broadcast
  equals what FlashComm2 saves.

Everything is closed-form arithmetic on the model's shape; nothing here
imports vLLM or torch.  Symbols (as in docs/user_guide.md):

``L``  hidden layers of one PP stage      ``h``  hidden size
``a``  heads x v_head_dim (o_proj input)  ``P``  TP size
``k``  o_proj TP size (``--otp-size``)    ``m = P / k``  ODP group size
``s``  prefetch step                      ``n``  o_shared group size (see below)
``W``  bytes of one o_proj shard: ``(a/k) x h x weight bytes``

Conventions:

* int8 (W8A8) weights count 1 byte per element.  Per-output-channel scales
  and offsets (``h`` values per layer, about 0.1 % of the layer) are NOT
  counted, so figures match the published ones that ignore them too.
* The o_shared group holds ranks that need the same shard and run the same
  layers at the same time, inside one PP stage.  For a dense model that is
  one ODP group of one DP replica (``n = P / k``): vLLM 0.32 runs dense DP
  replicas as independent engines, so a group may not span them and
  ``--dp`` changes only the device count.  For a MoE model with ``--dp > 1``
  vLLM steps the replicas in lockstep (the expert layers communicate across
  replicas every step), so the group joins the matching ODP group of every
  replica: ``n = dp * P / k``, which divides each rank's o_proj memory
  further.  FlashComm2's own collectives stay inside one replica's ODP
  group of ``m = P / k`` ranks, so the traffic figures do not change.
* Layer ownership and ring slots follow ``vllm_ascend_ext.ops.shared_weight.ring_index``:
  layer ``i`` (global index) is owned by group rank ``i % n``; position
  ``p`` uses slot ``p % s``; a rank allocates only the slots some non-owned
  position maps to (``s = 0``: one buffer for a synchronous broadcast).
* PP stages split layers like vLLM's default ``get_pp_indices`` (remainder
  layers go to the stages before the last); ``VLLM_PP_LAYER_PARTITION`` is
  not read.
* Broadcast time, pipelined: ``t = alpha + W / B`` (each receiver takes in
  ``W`` once at link bandwidth ``B``; ``alpha`` = ``--latency-us``).  A
  binomial tree would need ``ceil(log2 n) * (alpha + W / B)``; that figure is
  reported alongside.  Contention with FlashComm2's own collectives on the
  same links is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_ascend_ext.config import DEFAULT_ADAPTIVE_TOKENS
from vllm_ascend_ext.oshared_storage import AUTO, STORAGES, TP_SHARD, choose_storage
from vllm_ascend_ext.ops.shared_weight.ring_index import owner_of_layer_idx, slots_needed
from vllm_ascend_ext.pipeline_stages import pp_stage_ranges
from vllm_ascend_ext.tools.planner.errors import PlanError
from vllm_ascend_ext.tools.planner.link_model import LinkModel
from vllm_ascend_ext.tools.planner.shapes import ModelShape

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}

DEFAULT_TOKENS = (1, 256, 4096, 16384)
DEFAULT_LATENCY_US = 10.0


# --------------------------------------------------------------------------
# the arithmetic
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanInputs:
    tp: int = 16
    dp: int = 1
    pp: int = 1
    otp_size: int = 1  # k: o_proj TP size (FlashComm2 parallel size)
    prefetch_step: int = 1
    weight_dtype: str = "bf16"
    act_dtype: str = "bf16"
    int8_all_to_all: str = "off"  # off / static / dynamic (W8A8 activation scheme)
    link_gbps: float | None = None  # Gbit/s a rank receives at
    latency_us: float = DEFAULT_LATENCY_US
    layer_compute_us: float | None = None  # stated compute time of one layer
    compute_us_per_token: float = 0.0  # step model: per-layer compute per token
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    # adaptive FlashComm2's threshold (0 = off): with it on, o_shared keeps
    # plain TP's slice of every layer resident for the small passes
    adaptive_tokens: int = DEFAULT_ADAPTIVE_TOKENS
    # o_shared's storage setting (oshared_storage.STORAGES): the planner assumes
    # the quant method declares what to gather (every vLLM / vllm-ascend
    # method this project covers does, see ops/tp_shard/specs.py)
    storage: str = AUTO


def owned_layers(start: int, num_layers: int, n: int, rank: int) -> int:
    """Layers of ``[start, start + num_layers)`` that group rank ``rank`` owns."""
    return sum(1 for i in range(start, start + num_layers) if owner_of_layer_idx(i, n) == rank)


@dataclass
class RankMemory:
    rank: int  # rank inside the o_shared group
    owned_layers: int
    slots: int
    resident_bytes: int


@dataclass
class StageMemory:
    pp_rank: int
    start_layer: int
    num_layers: int
    plain_tp_bytes: int  # no FlashComm2: a/P x h per layer
    replicated_bytes: int  # FlashComm2 without o_shared: W per layer
    ours_max_bytes: int  # o_shared, this project's ring, worst rank
    ours_min_bytes: int
    upstream_bytes: int  # ceil(L/n) W + (s+1) W
    floor_bytes: float  # L W / n
    ranks: list[RankMemory] = field(default_factory=list)


def stage_memory(pp_rank: int, start: int, L: int, n: int, s: int,
                 W: int, plain_layer: int) -> StageMemory:
    ranks = []
    for r in range(n):
        owned, slots = owned_layers(start, L, n, r), len(slots_needed(start, L, n, r, s))
        ranks.append(RankMemory(r, owned, slots, (owned + slots) * W))
    resident = [x.resident_bytes for x in ranks]
    return StageMemory(
        pp_rank=pp_rank, start_layer=start, num_layers=L,
        plain_tp_bytes=L * plain_layer, replicated_bytes=L * W,
        ours_max_bytes=max(resident), ours_min_bytes=min(resident),
        upstream_bytes=(math.ceil(L / n) + s + 1) * W, floor_bytes=L * W / n,
        ranks=ranks,
    )


#: FlashComm2's int8 all-to-all (``VLLM_ASCEND_FLASHCOMM2_INT8_ALL_TO_ALL``):
#: ``off`` (activation dtype on the wire), or the W8A8 activation scheme.
INT8_ALL_TO_ALL_MODES = ("off", "static", "dynamic")
#: bytes of one per-token scale (fp32) in the dynamic scheme's all-reduce(MAX)
SCALE_BYTES = 4


def comm_per_layer(shape: ModelShape, tp: int, otp: int, act_bytes: int,
                   tokens: int, int8_all_to_all: str = "off") -> dict[str, float]:
    """Bytes one rank sends per layer for ``tokens`` tokens in the step.

    ``int8_all_to_all``: ``static`` sends the all-to-all in int8; ``dynamic``
    too, after a ring all-reduce(MAX) of one fp32 scale per padded token over
    the ODP group. The o_proj output collectives keep ``act_bytes``.
    """
    P, k, h, a, b = tp, otp, shape.hidden_size, shape.o_proj_in, act_bytes
    m = P // k  # ODP group size
    T = tokens
    Tp = math.ceil(T / P) * P  # FlashComm2 pads the token count to a multiple of P
    a2a_b = b if int8_all_to_all == "off" else DTYPE_BYTES["int8"]
    d = {
        "tokens": T,
        "padded_tokens": Tp,
        # plain TP: o_proj partial sums, ring all-reduce of [T, h]
        "tp_allreduce": 2 * (P - 1) / P * T * h * b,
        # FlashComm1: reduce-scatter now, all-gather before the next QKV
        "fc1_reduce_scatter": (P - 1) / P * T * h * b,
        # FlashComm2: all-to-all over ODP, [T, a/P] -> [T*k/P, a/k]
        "fc2_all_to_all": (m - 1) / m * Tp * (a / P) * a2a_b,
        # dynamic int8: every ODP rank agrees on the per-token scales first
        "fc2_scale_all_reduce": (2 * (m - 1) / m * Tp * SCALE_BYTES
                                 if int8_all_to_all == "dynamic" else 0.0),
        # k > 1: reduce-scatter over OTP of [T*k/P, h] -> [T/P, h]
        "fc2_otp_reduce_scatter": (k - 1) / k * (Tp * k / P) * h * b,
        # all-gather over TP of [T/P, h] -> [T, h] (skipped under sequence parallel)
        "fc2_all_gather": (P - 1) / P * Tp * h * b,
    }
    d["fc2_total"] = (d["fc2_all_to_all"] + d["fc2_scale_all_reduce"]
                      + d["fc2_otp_reduce_scatter"] + d["fc2_all_gather"])
    d["fc2_saved_vs_tp"] = d["tp_allreduce"] - d["fc2_total"]
    return d


def saved_bytes_per_token(shape: ModelShape, tp: int, otp: int, act_bytes: int,
                          int8_all_to_all: str = "off") -> float:
    """Bytes FlashComm2 saves per token per layer versus plain TP (no padding)."""
    P, k, h, a, b = tp, otp, shape.hidden_size, shape.o_proj_in, act_bytes
    m = P // k
    a2a_b = b if int8_all_to_all == "off" else DTYPE_BYTES["int8"]
    scales = 2 * (m - 1) / m * SCALE_BYTES if int8_all_to_all == "dynamic" else 0.0
    return (P - 1) / P * h * b - (m - 1) / m * (a / P) * a2a_b - scales - (k - 1) / P * h * b


def validate(shape: ModelShape, x: PlanInputs) -> None:
    if x.weight_dtype not in DTYPE_BYTES or x.act_dtype not in DTYPE_BYTES:
        raise PlanError(f"dtypes must be one of {sorted(DTYPE_BYTES)}")
    if x.int8_all_to_all not in INT8_ALL_TO_ALL_MODES:
        raise PlanError(f"--int8-all-to-all must be one of {list(INT8_ALL_TO_ALL_MODES)}, "
                        f"got {x.int8_all_to_all!r}")
    if x.int8_all_to_all != "off" and x.act_dtype == "int8":
        raise PlanError("--int8-all-to-all sends int8 on the all-to-all only; with "
                        "--act-dtype int8 every collective is int8 already")
    if x.dp < 1:
        raise PlanError(f"--dp must be >= 1, got {x.dp}")
    if x.tp < 2:
        raise PlanError(f"FlashComm2 needs tensor parallelism: --tp must be >= 2, got {x.tp}")
    if not (1 <= x.otp_size < x.tp and x.tp % x.otp_size == 0):
        raise PlanError(
            f"--otp-size {x.otp_size} must divide --tp {x.tp} and be smaller than it"
        )
    if shape.num_heads % x.tp:
        raise PlanError(
            f"{shape.name}: {shape.num_heads} attention heads are not divisible by --tp {x.tp}"
        )
    if x.prefetch_step < 0:
        raise PlanError(f"--prefetch-step must be >= 0, got {x.prefetch_step}")
    if any(t < 1 for t in x.tokens):
        raise PlanError("--tokens must be positive")
    for name, v in (("--link-gbps", x.link_gbps), ("--layer-compute-us", x.layer_compute_us)):
        if v is not None and v <= 0:
            raise PlanError(f"{name} must be > 0, got {v}")
    if x.storage not in STORAGES:
        raise PlanError(f"--storage must be one of {list(STORAGES)}, got {x.storage!r}")
    if x.compute_us_per_token < 0:
        raise PlanError(f"--compute-us-per-token must be >= 0, got {x.compute_us_per_token}")


def plan(shape: ModelShape, x: PlanInputs) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict."""
    validate(shape, x)
    P, k, s = x.tp, x.otp_size, x.prefetch_step
    m = P // k  # ODP group size: FlashComm2's all-to-all
    spans_dp = shape.is_moe and x.dp > 1  # MoE DP replicas step in lockstep
    n = m * (x.dp if spans_dp else 1)  # o_shared group size
    wb, ab = DTYPE_BYTES[x.weight_dtype], DTYPE_BYTES[x.act_dtype]
    a, h = shape.o_proj_in, shape.hidden_size
    W = (a // k) * h * wb
    plain_layer = (a // P) * h * wb

    if not 1 <= x.pp <= shape.num_layers:
        raise PlanError(f"--pp {x.pp} must be between 1 and the {shape.num_layers} hidden layers")
    stages_lr = pp_stage_ranges(shape.num_layers, x.pp)
    shortest = min(L for _, L in stages_lr)
    if s > shortest - 1:
        raise PlanError(
            f"--prefetch-step {s} must be at most {shortest - 1} (the shortest PP stage "
            f"has {shortest} layers)"
        )
    stages = [stage_memory(i, st, L, n, s, W, plain_layer) for i, (st, L) in enumerate(stages_lr)]
    worst = max(stages, key=lambda st: st.ours_max_bytes)

    # TP-shard storage: plain TP's shards plus the ring (one slot per prefetch
    # step; step 0 gathers into one buffer), on the stage with most layers.
    slots = max(s, 1)
    tp_shard_bytes = max(L for _, L in stages_lr) * plain_layer + slots * W
    slices = worst.plain_tp_bytes if x.adaptive_tokens else 0
    round_robin_bytes = worst.ours_max_bytes + slices
    choice = choose_storage(x.storage, adaptive_tokens=x.adaptive_tokens,
                            oshared_group_size=n, tp_size=P,
                            gather_spec="the quant method's declaration",
                            quant_method="the o_proj's quant method")
    tp_shard = choice.storage == TP_SHARD

    timing: dict[str, Any] | None = None
    if x.link_gbps is not None and x.layer_compute_us is not None:
        # Each receiver takes W in once (HCCL's pipelined ring).
        link = LinkModel(rate_bytes_per_s=x.link_gbps * 1e9 / 8, latency_s=x.latency_us * 1e-6,
                         broadcast="pipelined")
        if tp_shard:  # each rank receives (m-1)/m W of the all-gather
            xfer = link.transfer_s((m - 1) * W / m) * 1e6
            bcast = link.all_gather_s(W, m) * 1e6
        else:
            xfer = link.transfer_s(W) * 1e6
            bcast = link.broadcast_s(W, n) * 1e6
        window = s * x.layer_compute_us
        throughput_ok = xfer <= x.layer_compute_us
        latency_ok = s > 0 and bcast <= window
        hidden = throughput_ok and latency_ok
        if s == 0:
            exposed = bcast
        elif hidden:
            exposed = 0.0
        else:
            exposed = max(0.0, xfer - x.layer_compute_us, bcast - window)
        min_step = math.ceil(bcast / x.layer_compute_us) if throughput_ok else None
        timing = {
            "link_gbps": x.link_gbps,
            "link_gbytes_per_s": link.rate_bytes_per_s / 1e9,
            "latency_us": x.latency_us,
            "layer_compute_us": x.layer_compute_us,
            "transfer_us": xfer,
            "broadcast_us": bcast,
            "tree_broadcast_us": max(1, math.ceil(math.log2(n))) * bcast,
            "window_us": window,
            "throughput_ok": throughput_ok,
            "latency_ok": latency_ok,
            "hidden": hidden,
            "exposed_us_per_layer": exposed,
            "min_prefetch_step": min_step,
            "min_prefetch_step_fits": min_step is not None and min_step <= shortest - 1,
        }

    comm = [comm_per_layer(shape, P, k, ab, t, x.int8_all_to_all) for t in x.tokens]
    moved = (m - 1) * W / m if tp_shard else W
    for c in comm:
        c["oshared_broadcast"] = W
        c["oshared_transfer"] = moved
        c["net_saved_with_oshared"] = c["fc2_saved_vs_tp"] - moved
    per_token = saved_bytes_per_token(shape, P, k, ab, x.int8_all_to_all)
    # per-token, unpadded: (all-to-all + OTP reduce-scatter) / FC1 reduce-scatter
    a2a_b = ab if x.int8_all_to_all == "off" else DTYPE_BYTES["int8"]
    scales = 2 * (m - 1) / m * SCALE_BYTES if x.int8_all_to_all == "dynamic" else 0.0
    fc2_to_fc1 = (((m - 1) / m * (a / P) * a2a_b + scales + (k - 1) / P * h * ab)
                  / ((P - 1) / P * h * ab))
    break_even = moved / per_token if per_token > 0 else None

    out = {
        "model": asdict(shape) | {"o_proj_in": a, "o_proj_shape": [a, h]},
        "inputs": asdict(x) | {"tokens": list(x.tokens)},
        "layout": {
            "devices": P * x.dp * x.pp,
            "oshared_group_size": n,
            "oshared_spans_dp": spans_dp,
            "odp_group_size": m,
            "otp_group_size": k,
            "per_layer_bytes": W,
            "plain_tp_per_layer_bytes": plain_layer,
            "weight_bytes_per_element": wb,
            "int8_scales_counted": False,
        },
        "memory": {
            "worst_stage": worst.pp_rank,
            "plain_tp_bytes": worst.plain_tp_bytes,
            "replicated_bytes": worst.replicated_bytes,
            # FlashComm2 without o_shared as configured: its replicated shard,
            # plus plain TP's o_proj kept for the small steps when the switch
            # is on
            "flashcomm2_bytes": worst.replicated_bytes + slices,
            "ours_bytes": worst.ours_max_bytes,
            "upstream_bytes": worst.upstream_bytes,
            "floor_bytes": worst.floor_bytes,
            "saved_bytes": worst.replicated_bytes - worst.ours_max_bytes,
            # the two storages, per rank: round-robin = its ring plus the
            # resident row-parallel slices (L * a/P * h) when the switch is
            # on; TP shards = plain TP's o_proj plus one W per ring slot
            "storage": choice.storage,
            "storage_reason": choice.reason,
            "round_robin_bytes": round_robin_bytes,
            "tp_shard_bytes": tp_shard_bytes,
            "resident_slice_bytes": worst.plain_tp_bytes if tp_shard else slices,
            "ours_total_bytes": tp_shard_bytes if tp_shard else round_robin_bytes,
            # what one rank receives per layer per FlashComm2 step: an
            # all-gather over the ODP group (and sends as much at once), or a
            # broadcast of a whole layer from its owner
            "received_bytes_per_layer": (m - 1) * W // m if tp_shard else W,
            "tp_shard_received_bytes_per_layer": (m - 1) * W // m,
            "round_robin_received_bytes_per_layer": W,
            "stages": [asdict(st) for st in stages],
        },
        "timing": timing,
        "comm": comm,
        "fc2_saved_bytes_per_token": per_token,
        "fc2_to_fc1_ratio": fc2_to_fc1,
        "break_even_tokens": break_even,
    }
    return out
