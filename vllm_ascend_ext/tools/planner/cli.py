"""``vllm-ascend-ext plan``: the capacity planner's command line.

The planner (:mod:`vllm_ascend_ext.tools.planner.model`) answers memory,
broadcast and traffic questions in closed form; the step-time model
(:mod:`vllm_ascend_ext.tools.planner.step_model`) turns the traffic into predicted
throughput ratios and an adaptive threshold. This module joins the two for a
user who gives a link rate and a compute time per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vllm_ascend_ext.oshared_storage import STORAGES
from vllm_ascend_ext.tools.planner import model as planner_model
from vllm_ascend_ext.tools.planner.errors import PlanError
from vllm_ascend_ext.tools.planner.link_model import LinkModel
from vllm_ascend_ext.tools.planner.model import (
    DEFAULT_LATENCY_US,
    DEFAULT_TOKENS,
    DTYPE_BYTES,
    INT8_ALL_TO_ALL_MODES,
    PlanInputs,
    plan,
)
from vllm_ascend_ext.tools.planner.shapes import PRESETS, ModelShape, load_model_shape
from vllm_ascend_ext.tools.planner.step_model import (
    ADAPTIVE,
    ADAPTIVE_OSHARED,
    ALL_MODES,
    FLASHCOMM2,
    FLASHCOMM2_OSHARED,
    PLAIN_TP,
    ComputeModel,
    adaptive_threshold,
    predicted_ratios,
)
from vllm_ascend_ext.tools.planner.text import format_text, recommend

#: Each configuration's name in the JSON output and its column heading in the text.
_NAMES = {PLAIN_TP: ("plain TP", "plain TP"), FLASHCOMM2: ("FlashComm2 k=1", "FC2"),
          FLASHCOMM2_OSHARED: ("FlashComm2 k=1 + o_shared", "FC2+o_shared"),
          ADAPTIVE: ("adaptive FlashComm2 k=1", "adaptive"),
          ADAPTIVE_OSHARED: ("adaptive FlashComm2 k=1 + o_shared", "adaptive+o_shared")}


def step_model_section(shape: ModelShape, x: PlanInputs,
                       p: dict[str, Any]) -> dict[str, Any] | None:
    """Predicted throughput ratios per token count and the model's adaptive
    thresholds, or ``None`` without a link rate and a layer compute time.

    The share of o_shared's broadcast hidden behind compute comes from the
    plan's own prefetch check (exposed time per layer over broadcast time),
    so both answers rest on the same assumption."""
    t = p["timing"]
    if t is None:
        return None
    if x.otp_size != 1:
        return {"skipped": "the step model covers FlashComm2 k=1 (the benchmark's "
                           f"configurations); --otp-size is {x.otp_size}"}
    hidden = 1.0 - t["exposed_us_per_layer"] / t["broadcast_us"]
    # The planner's broadcast time is W / B per layer (HCCL's pipelined ring).
    link = LinkModel(rate_bytes_per_s=x.link_gbps * 1e9 / 8, latency_s=x.latency_us * 1e-6,
                     hidden=hidden, broadcast="pipelined")
    compute = ComputeModel(layer_fixed_s=x.layer_compute_us * 1e-6,
                           layer_per_token_s=x.compute_us_per_token * 1e-6)
    ab, wb = DTYPE_BYTES[x.act_dtype], DTYPE_BYTES[x.weight_dtype]
    # The model counts the stage the plan found worst; PP stages run their
    # layers one after the other, so the ratio of one stage is the ratio of all.
    stage = p["memory"]["stages"][p["memory"]["worst_stage"]]
    stage_shape = ModelShape(shape.name, shape.architecture, stage["num_layers"],
                             shape.hidden_size, shape.num_heads, shape.o_head_dim, shape.is_moe)
    rows = [{"tokens": T, "ratios": {
        _NAMES[mode][0]: ratio for mode, ratio in predicted_ratios(
            stage_shape, x.tp, T, link, compute, ab, wb, x.adaptive_tokens).items()}}
        for T in x.tokens]
    return {
        "broadcast_hidden_share": hidden,
        "compute_us_per_layer": {"fixed": x.layer_compute_us,
                                 "per_token": x.compute_us_per_token},
        "rows": rows,
        "adaptive_threshold": {
            "flashcomm2": adaptive_threshold(stage_shape, x.tp, link, ab, wb, oshared=False),
            "flashcomm2_oshared": adaptive_threshold(stage_shape, x.tp, link, ab, wb,
                                                     oshared=True),
        },
    }


def format_step_model(sm: dict[str, Any] | None, x: PlanInputs) -> str:
    if sm is None:
        return "step model  not assessed (give --link-gbps and --layer-compute-us)"
    if "skipped" in sm:
        return f"step model  skipped: {sm['skipped']}"
    c = sm["compute_us_per_layer"]
    out = [f"step model  throughput relative to plain TP; per layer compute {c['fixed']:g} us"
           + (f" + {c['per_token']:g} us per token" if c["per_token"] else "")
           + f", each collective's bytes at {x.link_gbps:g} Gbit/s + {x.latency_us:g} us, "
           f"{sm['broadcast_hidden_share']:.0%} of o_shared's broadcast hidden "
           "(from the prefetch check above); adaptive at "
           f"{x.adaptive_tokens} tokens",
           "  " + f"{'tokens':>7}" + "".join(f" {_NAMES[m][1]:>17}" for m in ALL_MODES)]
    for row in sm["rows"]:
        out.append("  " + f"{row['tokens']:>7}"
                   + "".join(f" {row['ratios'][_NAMES[m][0]]:>17.3f}" for m in ALL_MODES))
    th = sm["adaptive_threshold"]

    def say(v):
        return "never faster than plain TP (keep every step row-parallel)" if v is None \
            else f"{v:,} tokens"

    out += [f"  adaptive threshold from the model: FlashComm2 {say(th['flashcomm2'])}; "
            f"with o_shared {say(th['flashcomm2_oshared'])}"]
    if th["flashcomm2_oshared"] is not None:
        out.append("  (set VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS="
                   f"{th['flashcomm2_oshared'] if x.adaptive_tokens else th['flashcomm2']}; "
                   "the model leaves out kernel time differences and the scheduler's traffic)")
    return "\n".join(out)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ap = sub.add_parser(
        "plan", help="o_proj memory / broadcast / traffic plan for FlashComm2 + o_shared",
        description=planner_model.__doc__.split("\n\n")[0],
    )
    ap.add_argument("--model", required=True,
                    help=f"preset ({', '.join(sorted(PRESETS))}) or a config.json / model folder")
    ap.add_argument("--tp", type=int, default=PlanInputs.tp)
    ap.add_argument("--dp", type=int, default=PlanInputs.dp)
    ap.add_argument("--pp", type=int, default=PlanInputs.pp)
    ap.add_argument("--otp-size", type=int, default=PlanInputs.otp_size,
                    help="k: o_proj TP size (VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE)")
    ap.add_argument("--prefetch-step", type=int, default=PlanInputs.prefetch_step)
    ap.add_argument("--weight-dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    ap.add_argument("--act-dtype", choices=sorted(DTYPE_BYTES), default="bf16",
                    help="activation dtype on the wire")
    ap.add_argument("--int8-all-to-all", choices=INT8_ALL_TO_ALL_MODES, default="off",
                    help="W8A8 o_proj: FlashComm2's all-to-all in int8 with static or "
                    "dynamic (per-token) activation scales (VLLM_ASCEND_FLASHCOMM2_INT8_"
                    "ALL_TO_ALL, on by default where the o_proj takes int8 input)")
    ap.add_argument("--link-gbps", type=float, default=None,
                    help="bandwidth a rank sends and receives at, in Gbit/s")
    ap.add_argument("--latency-us", type=float, default=DEFAULT_LATENCY_US,
                    help="fixed cost of one collective (default %(default)s us)")
    ap.add_argument("--layer-compute-us", type=float, default=None,
                    help="compute time of one decoder layer per step (at your batch size, "
                         "or its fixed part with --compute-us-per-token)")
    ap.add_argument("--compute-us-per-token", type=float, default=0.0,
                    help="step model: compute per layer that grows with each token in the "
                         "step (default 0: --layer-compute-us at every token count)")
    ap.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS),
                    help="tokens per step to tabulate traffic and predicted ratios for")
    ap.add_argument("--adaptive-tokens", type=int, default=PlanInputs.adaptive_tokens,
                    help="adaptive FlashComm2 threshold (0 = off): steps of at most this "
                         "many tokens run plain TP")
    ap.add_argument("--storage", choices=STORAGES, default=PlanInputs.storage,
                    help="o_shared's storage, as VLLM_ASCEND_FLASHCOMM2_OSHARED_STORAGE: "
                         "auto (the plugin's choice), tp_shard or round_robin")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.set_defaults(func=run)
    return ap


def run(args: argparse.Namespace) -> int:
    try:
        shape = load_model_shape(args.model)
        x = PlanInputs(
            tp=args.tp, dp=args.dp, pp=args.pp, otp_size=args.otp_size,
            prefetch_step=args.prefetch_step, weight_dtype=args.weight_dtype,
            act_dtype=args.act_dtype, int8_all_to_all=args.int8_all_to_all,
            link_gbps=args.link_gbps,
            latency_us=args.latency_us, layer_compute_us=args.layer_compute_us,
            compute_us_per_token=args.compute_us_per_token, tokens=tuple(args.tokens),
            adaptive_tokens=args.adaptive_tokens, storage=args.storage,
        )
        p = plan(shape, x)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p["recommendation"] = recommend(p)
    p["step_model"] = step_model_section(shape, x, p)
    if args.json:
        print(json.dumps(p, indent=2))
    else:
        print(format_text(p) + "\n\n" + format_step_model(p["step_model"], x))
    return 0
