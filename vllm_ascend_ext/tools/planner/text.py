"""The plan as text: the recommendation sentences and the ``vllm-ascend-ext plan`` report."""

from __future__ import annotations

from typing import Any

__all__ = ["GIB", "MIB", "format_text", "recommend"]

GIB = 1 << 30
MIB = 1 << 20


def recommend(p: dict[str, Any]) -> list[str]:
    """What the plan ``p`` (:func:`~vllm_ascend_ext.tools.planner.model.plan`) advises, one
    sentence per finding."""
    mem, lay, t, x = p["memory"], p["layout"], p["timing"], p["inputs"]
    n, W = lay["oshared_group_size"], lay["per_layer_bytes"]
    other = "round_robin" if mem["storage"] == "tp_shard" else "tp_shard"
    lines = [
        f"o_shared storage: {mem['storage']} ({mem['storage_reason']}). It holds "
        f"{_gib(mem['ours_total_bytes'])} of o_proj per rank on the worst PP stage, against "
        f"{_gib(mem['flashcomm2_bytes'])} for FlashComm2 alone, "
        f"{_gib(mem[other + '_bytes'])} with {other} storage and "
        f"{_gib(mem['plain_tp_bytes'])} for plain TP; upstream's ring would hold "
        f"{_gib(mem['upstream_bytes'])}, the 1/{n} floor is {_gib(mem['floor_bytes'])}. "
        f"Each FlashComm2 step moves {_mib(mem['received_bytes_per_layer'])} per layer into "
        "each rank (" + ("an all-gather of the ODP group's shards, sending as much at once"
                         if mem["storage"] == "tp_shard" else
                         "a broadcast of the whole layer from its owner") + ")."
    ]
    if t is None:
        lines.append(
            "Broadcast timing not assessed: pass --link-gbps and --layer-compute-us."
        )
    elif t["hidden"]:
        lines.append(
            f"Prefetch step {x['prefetch_step']} hides the broadcast: {t['broadcast_us']:.0f} us "
            f"per layer against a {t['window_us']:.0f} us window, and the link keeps up "
            f"({t['transfer_us']:.0f} us of transfer per {x['layer_compute_us']:.0f} us layer)."
        )
    elif not t["throughput_ok"]:
        lines.append(
            f"The link cannot keep up: moving one layer ({_mib(W)}) takes "
            f"{t['transfer_us']:.0f} us but a layer computes in {x['layer_compute_us']:.0f} us, "
            "so every layer stalls whatever the prefetch step. Use o_shared only where "
            "memory is the binding limit (or on prefill nodes with longer layers), or a "
            "larger --otp-size (smaller shards)."
        )
    elif t["min_prefetch_step_fits"]:
        lines.append(
            f"Prefetch step {x['prefetch_step']} leaves {t['exposed_us_per_layer']:.0f} us exposed "
            f"per layer; use --prefetch-step {t['min_prefetch_step']} (one more "
            f"{_mib(W)} buffer per extra step at most)."
        )
    else:
        lines.append(
            f"The broadcast needs a prefetch step of {t['min_prefetch_step']}, more than "
            "this PP stage has layers; expect stalls."
        )
    be = p["break_even_tokens"]
    if be is None:
        lines.append("With this layout FlashComm2 sends no fewer bytes than plain TP.")
    else:
        lines.append(
            f"Per layer, FlashComm2 saves {p['fc2_saved_bytes_per_token']:.0f} bytes per token "
            f"against plain TP; o_shared's {_mib(p['comm'][0]['oshared_transfer'])} per layer "
            f"equals that at about "
            f"{be:,.0f} tokens per step. Below it (decode, small batches) that transfer "
            "moves more bytes than FlashComm2 saves and pays only while it stays hidden "
            "behind compute; upstream also found FlashComm2 slows decode, so prefer it "
            "for prefill-heavy serving."
        )
    if n < 2:
        lines.append("The o_shared group has one rank: there is nothing to share.")
    return lines


def _gib(v: float) -> str:
    return f"{v / GIB:.2f} GiB"


def _mib(v: float) -> str:
    return f"{v / MIB:.1f} MiB"


def _bytes(v: float) -> str:
    return _gib(v) if abs(v) >= GIB else _mib(v) if abs(v) >= MIB else f"{v / 1024:.1f} KiB"


def format_text(p: dict[str, Any]) -> str:
    m, x, lay, mem = p["model"], p["inputs"], p["layout"], p["memory"]
    out = [
        f"model      {m['name']} ({m['architecture']}): {m['num_layers']} layers, "
        f"hidden {m['hidden_size']}, o_proj {m['o_proj_in']} x {m['hidden_size']}",
        f"layout     TP {x['tp']} x DP {x['dp']} x PP {x['pp']} = {lay['devices']} devices; "
        f"o_proj TP size k={x['otp_size']}, o_shared group n={lay['oshared_group_size']} "
        + (f"(spans the {x['dp']} DP replicas of a PP stage: MoE replicas step in lockstep)"
           if lay["oshared_spans_dp"] else "(per DP replica and PP stage)")
        + f", prefetch step {x['prefetch_step']}",
        f"weights    {x['weight_dtype']}: one o_proj shard W = {_mib(lay['per_layer_bytes'])}"
        + (" (int8 scales not counted)" if x["weight_dtype"] == "int8" else ""),
        "",
        f"o_proj bytes per rank (worst PP stage: {mem['worst_stage']})",
        f"  plain TP (no FlashComm2)          {_gib(mem['plain_tp_bytes']):>12}",
        f"  FlashComm2, replicated            {_gib(mem['replicated_bytes']):>12}",
        f"  FlashComm2 alone as configured    {_gib(mem['flashcomm2_bytes']):>12}"
        + ("   (+ plain TP's o_proj for the small steps)" if x["adaptive_tokens"]
           else "   (adaptive off)"),
        f"  round-robin ring (worst rank)     {_gib(mem['ours_bytes']):>12}",
        f"  o_shared, upstream's ring         {_gib(mem['upstream_bytes']):>12}"
        "   (ceil(L/n)W + (s+1)W)",
        f"  floor L*W/n                       {_gib(mem['floor_bytes']):>12}",
        f"  o_shared, round-robin storage     {_gib(mem['round_robin_bytes']):>12}"
        + ("   (ring + plain TP's slices for the small steps)" if x["adaptive_tokens"]
           else "   (adaptive off)"),
        f"  o_shared, TP-shard storage        {_gib(mem['tp_shard_bytes']):>12}"
        f"   (plain TP's shards + {max(x['prefetch_step'], 1)} ring slot(s))",
        f"  o_shared as configured            {_gib(mem['ours_total_bytes']):>12}"
        f"   ({mem['storage']})",
    ]
    for st in mem["stages"]:
        worst = max(st["ranks"], key=lambda r: r["resident_bytes"])
        out.append(
            f"  stage {st['pp_rank']}: layers {st['start_layer']}-"
            f"{st['start_layer'] + st['num_layers'] - 1}, worst rank owns "
            f"{worst['owned_layers']} + {worst['slots']} ring slot(s)"
        )
    t = p["timing"]
    out.append("")
    if t is None:
        out.append("broadcast  not assessed (give --link-gbps and --layer-compute-us)")
    else:
        out += [
            f"broadcast  W / B + alpha = {t['transfer_us']:.1f} + {t['latency_us']:.1f} = "
            f"{t['broadcast_us']:.1f} us per layer at {t['link_gbps']:g} Gbit/s "
            f"({t['link_gbytes_per_s']:.1f} GB/s); binomial tree {t['tree_broadcast_us']:.1f} us",
            f"           window = prefetch step x layer compute = {t['window_us']:.1f} us; "
            f"link keeps up: {'yes' if t['throughput_ok'] else 'no'}; "
            f"hidden: {'yes' if t['hidden'] else 'no'}"
            + (f"; smallest step that hides it: {t['min_prefetch_step']}"
               if t["min_prefetch_step"] is not None else ""),
        ]
    wire = {"off": "", "static": "; all-to-all in int8",
            "dynamic": "; all-to-all in int8, plus the all-reduce of fp32 per-token scales"}
    out += ["", f"bytes sent per rank per layer ({x['act_dtype']} activations"
            f"{wire[x['int8_all_to_all']]})",
            f"  {'tokens':>7} {'TP allreduce':>13} {'FC2 a2a':>11} {'FC2 otp-RS':>11} "
            f"{'FC2 allgather':>13} {'FC2 saves':>11} {'saves - W':>11}"]
    for c in p["comm"]:
        out.append(
            f"  {c['tokens']:>7} {_bytes(c['tp_allreduce']):>13} "
            f"{_bytes(c['fc2_all_to_all'] + c['fc2_scale_all_reduce']):>11} "
            f"{_bytes(c['fc2_otp_reduce_scatter']):>11} {_bytes(c['fc2_all_gather']):>13} "
            f"{_bytes(c['fc2_saved_vs_tp']):>11} {_bytes(c['net_saved_with_oshared']):>11}"
        )
    out.append(f"  FC2 all-to-all / FC1 reduce-scatter bytes: {p['fc2_to_fc1_ratio']:.3f}"
               + (" (= a/(P*h))" if x["otp_size"] == 1 and x["int8_all_to_all"] == "off"
                  else ""))
    be = p["break_even_tokens"]
    out.append("  break-even (o_shared transfer = FC2 saving): "
               + (f"{be:,.0f} tokens" if be is not None else "never"))
    out += ["", "recommendation"] + [f"  - {line}" for line in recommend(p)]
    return "\n".join(out)
