"""A step-time model of plain TP, FlashComm2 and o_shared on a link.

Per forward step of ``T`` tokens over ``L`` layers at TP ``P``, each rank
spends compute (the same in every configuration: the o_proj reads different
bytes, but on the tiny and real shapes alike the attention and MLP dominate)
plus, for every collective, its bytes per direction over the link rate plus a
latency term:

=====================  ======================================================
configuration          collectives per layer (dense decoder)
=====================  ======================================================
plain TP               all-reduce after o_proj + all-reduce after the MLP
FlashComm2 k           all-to-all + (k > 1: OTP reduce-scatter) + all-gather,
                       then the MLP's all-reduce
+ o_shared             TP-shard storage (the default): one all-gather of
                       ``W`` per layer, each rank sending and receiving
                       ``(P-1)/P W`` at once; round-robin storage: one
                       broadcast of ``W`` per layer, one after another
                       (``(P-1) W`` from the owner on gloo, ``W`` per rank on
                       a pipelined HCCL/NCCL ring). Never hidden here (on 2
                       CPU cores gloo has no core to overlap on; a real NPU
                       may hide it: ``hidden`` > 0)
adaptive (+ o_shared)  steps of at most ``threshold`` tokens: plain TP's
                       collectives, and no o_shared transfer
=====================  ======================================================

plus one all-reduce per step for the vocabulary-parallel embedding.
Ranks send concurrently, so a collective's time is its per-rank bytes (what
:func:`vllm_ascend_ext.tools.planner.model.comm_per_layer` counts) over the rate.

What the model cannot know: how much of a broadcast an accelerator hides
behind compute, the kernel time of each configuration's o_proj, and the
scheduler's own traffic between hosts (vLLM sends each step's batch to the
headless node); :func:`calibrated_compute_s` takes the compute from one
measured plain-TP run so that only the communication is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_ascend_ext.oshared_storage import ROUND_ROBIN, TP_SHARD
from vllm_ascend_ext.tools.planner.link_model import LinkModel
from vllm_ascend_ext.tools.planner.model import comm_per_layer
from vllm_ascend_ext.tools.planner.shapes import ModelShape

__all__ = ["ADAPTIVE", "ADAPTIVE_OSHARED", "ALL_MODES", "FLASHCOMM2", "FLASHCOMM2_OSHARED",
           "PLAIN_TP", "ComputeModel", "OprojMode", "StepCost", "adaptive_threshold",
           "calibrated_compute_s", "predicted_ratios", "workload_steps", "workload_comm"]


@dataclass(frozen=True)
class OprojMode:
    """How a configuration runs the o_proj (FlashComm2 with k = 1)."""

    flashcomm2: bool = False
    oshared: bool = False  # o_shared's transfer per layer (needs flashcomm2)
    adaptive: bool = False  # steps of at most the threshold run plain TP
    storage: str = TP_SHARD  # o_shared's storage (oshared_storage.py)


PLAIN_TP = OprojMode()
FLASHCOMM2 = OprojMode(flashcomm2=True)
FLASHCOMM2_OSHARED = OprojMode(flashcomm2=True, oshared=True)
ADAPTIVE = OprojMode(flashcomm2=True, adaptive=True)
ADAPTIVE_OSHARED = OprojMode(flashcomm2=True, oshared=True, adaptive=True)
#: The configurations the model compares (and the throughput benchmark runs).
ALL_MODES = (PLAIN_TP, FLASHCOMM2, FLASHCOMM2_OSHARED, ADAPTIVE, ADAPTIVE_OSHARED)


#: Bytes on an Ethernet link per byte a collective sends over TCP: a full
#: segment carries 1448 B of payload (MTU 1500, TCP timestamps) in a 1514 B
#: frame, and the peer acknowledges every second segment with a 66 B frame.
TCP_FRAMING = (1514 + 66 / 2) / 1448


@dataclass(frozen=True)
class StepCost:
    link_seconds: float  # communication time of the step
    wire_bytes: float  # payload bytes crossing the link, both directions
    collectives: int


@dataclass(frozen=True)
class ComputeModel:
    """Compute time of one decoder layer on one rank: a fixed part (kernel
    launches, the weights read once per step) plus a part per token in the
    step. The same in every configuration (see the module docstring)."""

    layer_fixed_s: float
    layer_per_token_s: float = 0.0

    def step_s(self, num_layers: int, tokens: int) -> float:
        return num_layers * (self.layer_fixed_s + self.layer_per_token_s * tokens)


def step_cost(shape: ModelShape, tp: int, tokens: int, mode: OprojMode, link: LinkModel,
              act_bytes: int, weight_bytes: int, threshold: int) -> StepCost:
    fc2, oshared = mode.flashcomm2, mode.oshared
    small = mode.adaptive and tokens <= threshold
    c = comm_per_layer(shape, tp, 1, act_bytes, tokens)
    L, P = shape.num_layers, tp
    if fc2 and not small:
        o_proj = c["fc2_all_to_all"] + c["fc2_all_gather"]
        o_proj_collectives = 2
    else:
        o_proj, o_proj_collectives = c["tp_allreduce"], 1
    per_rank = L * (o_proj + c["tp_allreduce"]) + c["tp_allreduce"]  # + embedding
    collectives = L * (o_proj_collectives + 1) + 1
    seconds = link.collectives_s(per_rank, collectives)
    wire = per_rank * P
    if oshared and not small:
        W = shape.o_proj_in * shape.hidden_size * weight_bytes
        if mode.storage == ROUND_ROBIN:
            # Each layer leaves its owner once for every other rank. The series
            # broadcasts one layer at a time, so the broadcasts add up even
            # though their owners differ: at P=2 each one uses one direction of
            # the link while the other idles (measured on the two-host fixture).
            wire += L * W * (P - 1)
            seconds += L * link.broadcast_s(W, P)
        else:
            # Every rank sends its shard to every other: (P-1)/P W each way.
            wire += L * W * (P - 1)
            seconds += L * link.all_gather_s(W, P)
        collectives += L
    return StepCost(seconds, wire, collectives)


def workload_steps(num_prompts: int, input_len: int, output_len: int,
                   max_batched_tokens: int) -> list[tuple[int, int]]:
    """(tokens in the step, how many such steps) of a batch of equal requests
    all admitted at once: chunked prefill, then ``output_len - 1`` decode
    steps of one token per request (the first output token comes with the
    last prefill chunk)."""
    total = num_prompts * input_len
    steps = [(max_batched_tokens, total // max_batched_tokens)] if total >= max_batched_tokens \
        else []
    if total % max_batched_tokens:
        steps.append((total % max_batched_tokens, 1))
    if output_len > 1:
        steps.append((num_prompts, output_len - 1))
    return steps


def workload_comm(shape: ModelShape, tp: int, steps: list[tuple[int, int]], mode: OprojMode,
                  link: LinkModel, act_bytes: int, weight_bytes: int,
                  threshold: int) -> StepCost:
    """The summed communication of a workload's steps (``wire_bytes`` here
    as the link counts them: with TCP/IP/Ethernet framing)."""
    secs = wire = 0.0
    n = 0
    for tokens, count in steps:
        c = step_cost(shape, tp, tokens, mode, link, act_bytes, weight_bytes, threshold)
        secs += count * c.link_seconds
        wire += count * c.wire_bytes
        n += count * c.collectives
    return StepCost(secs, wire * TCP_FRAMING, n)


def calibrated_compute_s(measured_plain_s: float, plain_comm: StepCost) -> float:
    """Compute time of a workload: a measured plain-TP duration minus what the
    model says its communication took (never below zero)."""
    return max(0.0, measured_plain_s - plain_comm.link_seconds)


def predicted_ratios(shape: ModelShape, tp: int, tokens: int, link: LinkModel,
                     compute: ComputeModel, act_bytes: int, weight_bytes: int,
                     threshold: int) -> dict[OprojMode, float]:
    """Throughput of every configuration relative to plain TP for steps of
    ``tokens`` tokens: plain TP's step time over the configuration's."""
    base = compute.step_s(shape.num_layers, tokens)
    times = {mode: base + step_cost(shape, tp, tokens, mode, link, act_bytes, weight_bytes,
                                    threshold).link_seconds for mode in ALL_MODES}
    return {mode: times[PLAIN_TP] / t for mode, t in times.items()}


def adaptive_threshold(shape: ModelShape, tp: int, link: LinkModel, act_bytes: int,
                       weight_bytes: int, oshared: bool,
                       max_tokens: int = 1 << 20) -> int | None:
    """The adaptive threshold the model recommends: one token below the
    smallest step at which always-on FlashComm2 (with o_shared's broadcast,
    as much of it exposed as ``link.hidden`` says) is faster than plain TP.
    ``None`` when it never is up to ``max_tokens`` (then keep every step on
    the plain row-parallel side, or turn FlashComm2 off).

    FlashComm2's saving grows with the tokens while its extra collective's
    latency and the broadcast are fixed per step, so past the padding to a
    multiple of ``tp`` the sign changes once: doubling finds a bracket,
    bisection the edge. Compute is the same on both sides, so only the
    link decides."""
    mode = FLASHCOMM2_OSHARED if oshared else FLASHCOMM2

    def faster(t: int) -> bool:
        plain = step_cost(shape, tp, t, PLAIN_TP, link, act_bytes, weight_bytes, 0)
        ours = step_cost(shape, tp, t, mode, link, act_bytes, weight_bytes, 0)
        return ours.link_seconds < plain.link_seconds

    hi = tp  # below one token per rank FlashComm2 only pads
    while not faster(hi):
        if hi >= max_tokens:
            return None
        hi = min(2 * hi, max_tokens)
    lo = hi // 2  # not faster (or below the first probe)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if faster(mid) else (mid, hi)
    return hi - 1
