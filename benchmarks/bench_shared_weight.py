"""Benchmark the o_shared shared-weight series on 2 gloo ranks (CPU stack).

    .venv/bin/python benchmarks/bench_shared_weight.py --out results/bench_shared_weight.json

Measures, on real 2-process gloo groups built through vLLM's parallel state:

(a) host overhead per layer of the hooks (``prefetch_after`` + ``wait``) with
    64x64 weights, timed around the two calls only, with enough other work
    between them that the broadcast has landed by the time of the wait; plus
    the same with no other work (the broadcast is then on the critical path).
(b) bytes per rank: o_shared resident vs full replication vs the floor L*W/n.
(c) hidden broadcast: L layers, each a layer matmul plus a sized "rest of the
    layer" matmul; wall time with the o_shared series (weights arrive by
    broadcast) vs. the same loop with every weight replicated (compute alone).
(d) side by side with the upstream seed (``upstream_seed.py`` loads it): each
    implementation runs in its OWN 2-rank world (separate processes), in
    ``--runs`` alternating pairs (ours first in even runs, upstream first in
    odd ones, to cancel drift).  Per-layer wall time of an L-layer loop of
    64x64 fp32 o_projs, "bare" (o_proj + tanh only: nothing to overlap) and
    "compute" (an attention-sized matmul before each o_proj and a two-matmul
    MLP after it).  Ratios ours/upstream per run, at equal step (ours k = s)
    and at equal buffer count (ours k = s + 1 ring slots vs upstream's s + 1
    windows), with min / median / max over the runs; resident bytes of every
    configuration are measured, not assumed.

Writes JSON to ``--out`` and a text table next to it (same name, ``.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dist_utils import run_distributed  # noqa: E402
from upstream_seed import DEFAULT_SEED  # noqa: E402

from vllm_ascend_ext.cpu_attention import cpu_model_name  # noqa: E402


def _make_layers(start, L, dim_out, dim_in, hooks_inside):
    import torch
    from vllm.model_executor.layers.linear import ReplicatedLinear

    cls = ReplicatedLinear
    if not hooks_inside:

        class ManualHooksLinear(ReplicatedLinear):
            places_shared_weight_hooks = True

        cls = ManualHooksLinear
    layers = []
    for i in range(start, start + L):
        layer = cls(dim_in, dim_out, bias=False, params_dtype=torch.float32,
                    prefix=f"model.layers.{i}.self_attn.o_proj")
        # same GEMM (F.linear) for shared and replicated layers: o_shared sets
        # this flag at registration, so the baseline must use it as well
        layer._cpu_skip_gemm_dispatch = True
        layers.append(layer)
    return layers


def _load_and_finalise(layers, dim_out, dim_in):
    import torch

    for layer in layers:
        idx = int(layer.prefix.split(".")[2])
        g = torch.Generator().manual_seed(idx)
        layer.weight.weight_loader(layer.weight, torch.randn(dim_out, dim_in, generator=g))
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)


def _bench_hooks(group, args, filler_dim):
    """(a): time inside prefetch_after + wait per layer."""
    import torch
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    L, D = args.layers, 64
    layers = _make_layers(0, L, D, D, hooks_inside=False)
    series = SharedWeightSeries(f"bench-hooks-{filler_dim}", group, args.prefetch_step)
    for layer in layers:
        series.add_layer(layer)
    _load_and_finalise(layers, D, D)
    x = torch.randn(args.tokens, D)
    fa = torch.randn(256, filler_dim) if filler_dim else None
    fb = torch.randn(filler_dim, filler_dim) if filler_dim else None

    def one_pass(record):
        h = x
        for p, layer in enumerate(layers):
            t0 = time.perf_counter()
            series.wait(p, h)
            t1 = time.perf_counter()
            y = layer(h)[0]
            t2 = time.perf_counter()
            series.prefetch_after(p, y)
            t3 = time.perf_counter()
            if fa is not None:
                torch.mm(fa, fb)  # rest of the layer (attention/MLP stand-in)
            h = torch.tanh(y)
            if record is not None:
                record["wait"].append(t1 - t0)
                record["prefetch"].append(t3 - t2)

    for _ in range(args.warmup):
        one_pass(None)
    rec = {"wait": [], "prefetch": []}
    for _ in range(args.iters):
        one_pass(rec)
    series.synchronize()
    group.barrier()
    per_layer = [a + b for a, b in zip(rec["wait"], rec["prefetch"])]
    out = {
        "layers": L,
        "weight": [D, D],
        "filler_matmul": [256, filler_dim, filler_dim] if filler_dim else None,
        "hook_us_median": statistics.median(per_layer) * 1e6,
        "hook_us_mean": statistics.fmean(per_layer) * 1e6,
        "prefetch_us_median": statistics.median(rec["prefetch"]) * 1e6,
        "wait_us_median": statistics.median(rec["wait"]) * 1e6,
        "memory": series.memory_report().__dict__,
    }
    series.close()
    return out


def _bench_ops_only(group, args):
    """(a0): the hooks' own host cost when there is nothing to communicate.

    One layer, k=0: after the first synchronous fetch the slot already holds
    the layer, so wait/prefetch only dispatch the custom ops and check state.
    Also times issuing a bare gloo async broadcast, for reference.
    """
    import torch
    import torch.distributed as dist
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    layers = _make_layers(0, 1, 64, 64, hooks_inside=False)
    series = SharedWeightSeries("bench-ops-only", group, 0)
    series.add_layer(layers[0])
    _load_and_finalise(layers, 64, 64)
    x = torch.randn(args.tokens, 64)
    series.wait(0, x)  # first (and only) fetch
    n = 5000
    t0 = time.perf_counter()
    for _ in range(n):
        series.wait(0, x)
        series.prefetch_after(0, x)
    ops_us = (time.perf_counter() - t0) / n * 1e6
    broadcasts = series.num_broadcasts
    series.close()

    buf = torch.zeros(64 * 64 * 4, dtype=torch.uint8)
    fa, fb = torch.randn(256, 256), torch.randn(256, 256)
    issue = []
    group.barrier()
    for i in range(200):
        t1 = time.perf_counter()
        work = dist.broadcast(buf, src=group.ranks[i % 2], group=group.device_group,
                              async_op=True)
        issue.append(time.perf_counter() - t1)
        torch.mm(fa, fb)
        work.wait()
    return {"ops_us_per_layer": ops_us, "broadcasts_after_first": broadcasts - 1,
            "gloo_async_issue_us_median": statistics.median(issue) * 1e6}


def _bench_hidden(group, args):
    """(c): the same L-layer loop, weights replicated vs. delivered by o_shared."""
    import torch
    import torch.distributed as dist
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    L, D, T, F = args.layers, args.dim, args.tokens, args.filler
    variants = {"replicated": _make_layers(0, L, D, D, hooks_inside=True)}
    _load_and_finalise(variants["replicated"], D, D)
    series = {}
    for k in sorted({args.prefetch_step, 0}):
        layers = _make_layers(0, L, D, D, hooks_inside=True)
        series[k] = SharedWeightSeries(f"bench-hidden-k{k}", group, k)
        for layer in layers:
            series[k].add_layer(layer)
        _load_and_finalise(layers, D, D)
        variants[f"o_shared_k{k}"] = layers
    x = torch.randn(T, D)
    fa, fb = torch.randn(T, F), torch.randn(F, F)
    raw_buf = torch.zeros(series[args.prefetch_step].per_layer_bytes, dtype=torch.uint8)

    def run(layers, raw=False):
        h, work = x, None
        for p, layer in enumerate(layers):
            if work is not None:
                work.wait()
            y = layer(h)[0]
            if raw:  # bare transport at the same point, no o_shared code
                work = dist.broadcast(raw_buf, src=group.ranks[p % 2],
                                      group=group.device_group, async_op=True)
            torch.mm(fa, fb)  # rest of the layer
            h = torch.tanh(y)
        if work is not None:
            work.wait()
        return h

    def timed(name):
        layers = variants["replicated" if name == "raw_async_bcast" else name]
        group.barrier()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            run(layers, raw=name == "raw_async_bcast")
        for s in series.values():
            s.synchronize()
        return (time.perf_counter() - t0) / args.iters

    names = list(variants) + ["raw_async_bcast"]
    for _ in range(args.warmup):
        for name in names:
            timed(name)
    times = {name: [] for name in names}
    for _ in range(args.rounds):  # interleaved rounds cancel drift
        for name in names:
            times[name].append(timed(name))
    ref = run(variants["replicated"])
    same = {name: bool(torch.equal(run(variants[name]), ref))
            for name in variants if name != "replicated"}
    for s in series.values():
        s.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        torch.mm(fa, fb)
    filler_ms = (time.perf_counter() - t0) / args.iters * 1e3
    best = {name: min(v) * 1e3 for name, v in times.items()}
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    out = {
        "layers": L, "weight": [D, D], "tokens": T, "filler_matmul": [T, F, F],
        "filler_ms_per_layer": filler_ms,
        "ms_per_pass_best": best, "ms_per_pass_median": med,
        "ratio_best": {n: best[n] / best["replicated"] for n in names},
        "ratio_median": {n: med[n] / med["replicated"] for n in names},
        "outputs_identical": same,
        "memory": series[args.prefetch_step].memory_report().__dict__,
    }
    for s in series.values():
        s.close()
    return out


# --------------------------------------------------------------------------
# (d) side by side with the upstream seed, each implementation in its own world
# --------------------------------------------------------------------------


def _ours_build(group, args, k):
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    D = args.sbs_dim
    layers = _make_layers(0, args.layers, D, D, hooks_inside=True)
    series = SharedWeightSeries(f"sbs-ours-k{k}", group, k)
    for layer in layers:
        series.add_layer(layer)
    _load_and_finalise(layers, D, D)  # vLLM's post-load pass finalises the series
    return layers, series.synchronize, series.memory_report().__dict__, series.close


def _seed_build(seed, group, args, s):
    """The seed's documented life cycle: register, load, post-process."""
    D = args.sbs_dim
    layers = _make_layers(0, args.layers, D, D, hooks_inside=True)
    name = f"sbs-seed-s{s}"
    for layer in layers:
        seed.register_layer_to_shared_weight_series(name, group, layer, s)
    _load_and_finalise(layers, D, D)  # the seed made both steps no-ops for its layers
    seed.post_process_after_loading_for_shared_weight_series(layers[0])
    meta = seed._series_dict[name]

    def synchronize():  # benchmark-side: drain outstanding windows between timings
        for window in meta.shared_windows:
            if window.work is not None:
                window.work.wait()
                window.work = None

    # resident bytes: distinct storages of the owned weights plus the windows
    storages = {}
    for t in [lm.weight for lm in meta.layers if meta.is_source(lm.layer_idx)] + [
            w.weight for w in meta.shared_windows]:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    per = D * D * 4
    memory = {
        "num_layers": meta.num_layers, "world_size": group.world_size,
        "prefetch_step": s, "per_layer_bytes": per,
        "owned_layers": sum(meta.is_source(lm.layer_idx) for lm in meta.layers),
        "slots": len(meta.shared_windows), "resident_bytes": sum(storages.values()),
        "replicated_bytes": meta.num_layers * per,
        "floor_bytes": meta.num_layers * per / group.world_size,
    }
    return layers, synchronize, memory, synchronize


def _bench_side_by_side(group, args, impl):
    """(d): one implementation's configurations, timed in this world only."""
    import torch
    import torch.distributed as dist

    L, D, T = args.layers, args.sbs_dim, args.tokens
    H, I = args.sbs_hidden, args.sbs_inter
    configs = {"replicated": (_make_layers(0, L, D, D, hooks_inside=True), None)}
    _load_and_finalise(configs["replicated"][0], D, D)
    memory, syncs, closers = {}, [], []
    if impl == "ours":
        for k in args.ours_steps:
            layers, sync, memory[f"k{k}"], close = _ours_build(group, args, k)
            configs[f"k{k}"] = (layers, None)
            syncs.append(sync)
            closers.append(close)
    else:
        from upstream_seed import load_seed

        seed = load_seed(Path(args.seed))  # ADAPTER: re-indents the seed, see upstream_seed.py
        for s in args.upstream_steps:
            layers, sync, memory[f"s{s}"], _ = _seed_build(seed, group, args, s)
            configs[f"s{s}"] = (layers, seed.reach_layer_for_shared_weight_series)
            syncs.append(sync)

    x = torch.randn(T, D)
    a_in, w_attn = torch.randn(T, H), torch.randn(H, H) / H**0.5
    m_in, w_up, w_down = torch.randn(T, H), torch.randn(H, I), torch.randn(I, H)

    def one_pass(layers, reach, compute):
        h = x
        for layer in layers:
            if reach is not None:  # upstream: where its MLA calls it, before attention
                reach(layer)
            if compute:
                torch.mm(a_in, w_attn)  # attention stand-in, before o_proj
            y = layer(h)[0]  # o_proj (both designs' hooks run in its forward)
            if compute:
                torch.mm(torch.mm(m_in, w_up), w_down)  # MLP stand-in, after o_proj
            h = torch.tanh(y)
        return h

    def sync_all():
        for sync in syncs:
            sync()

    def timed(name, compute, passes):
        layers, reach = configs[name]
        sync_all()
        group.barrier()
        t0 = time.perf_counter()
        for _ in range(passes):
            one_pass(layers, reach, compute)
        sync_all()
        return (time.perf_counter() - t0) / passes / L * 1e6

    us = {}
    for mode, compute, passes in (("bare", False, args.sbs_passes),
                                  ("compute", True, args.compute_passes)):
        for name in configs:
            timed(name, compute, args.sbs_warmup)
        rounds = {name: [] for name in configs}
        for _ in range(args.sbs_rounds):  # interleaved inside the world as well
            for name in configs:
                rounds[name].append(timed(name, compute, passes))
        us[mode] = {name: {"median": statistics.median(v), "rounds": v}
                    for name, v in rounds.items()}

    ref = one_pass(configs["replicated"][0], None, False)
    same = {name: bool(torch.equal(one_pass(layers, reach, False), ref))
            for name, (layers, reach) in configs.items() if name != "replicated"}
    sync_all()

    # scale references: the stand-in compute alone, and one synchronous broadcast
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        torch.mm(a_in, w_attn)
        torch.mm(torch.mm(m_in, w_up), w_down)
    compute_us = (time.perf_counter() - t0) / n * 1e6
    buf = torch.zeros(D * D * 4, dtype=torch.uint8)
    group.barrier()
    t0 = time.perf_counter()
    for i in range(n):
        dist.broadcast(buf, src=group.ranks[i % 2], group=group.device_group)
    bcast_us = (time.perf_counter() - t0) / n * 1e6
    for close in closers:
        close()
    return {"impl": impl, "us_per_layer": us, "memory": memory,
            "outputs_identical": same, "compute_us_per_layer": compute_us,
            "sync_bcast_us": bcast_us}


def _sbs_worker(rank, world_size, args, impl):
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import get_tp_group

    torch.set_num_threads(1)
    with set_current_vllm_config(VllmConfig()):
        return _bench_side_by_side(get_tp_group(), args, impl)


def _worker(rank, world_size, args):
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import get_tp_group

    torch.set_num_threads(1)
    with set_current_vllm_config(VllmConfig()):
        group = get_tp_group()
        return {
            "ops_only": _bench_ops_only(group, args),
            "hooks_hidden": _bench_hooks(group, args, filler_dim=args.hook_filler),
            "hooks_exposed": _bench_hooks(group, args, filler_dim=0),
            "hidden": _bench_hidden(group, args),
        }


def _core_table(res) -> str:
    k = res["args"]["prefetch_step"]
    ranks = res["per_rank"]
    a0 = [pr["ops_only"] for pr in ranks]
    a = [pr["hooks_hidden"] for pr in ranks]
    ax = [pr["hooks_exposed"] for pr in ranks]
    lines = [
        f"o_shared benchmark - {res['machine']}, gloo, 2 ranks, 1 torch thread/rank",
        "",
        f"(a) host time per layer in prefetch_after + wait, 64x64 fp32, "
        f"{a[0]['layers']} layers, k={k}  (rank 0 / rank 1, medians)",
        "    hooks alone, nothing to send   : "
        + " / ".join(f"{r['ops_us_per_layer']:.1f} us" for r in a0),
        "    bare gloo async-broadcast issue: "
        + " / ".join(f"{r['gloo_async_issue_us_median']:.1f} us" for r in a0),
        "    broadcast hidden by other work : "
        + " / ".join(f"{r['hook_us_median']:.1f} us (prefetch {r['prefetch_us_median']:.1f},"
                     f" wait {r['wait_us_median']:.1f})" for r in a),
        "    nothing to hide it behind      : "
        + " / ".join(f"{r['hook_us_median']:.1f} us (prefetch {r['prefetch_us_median']:.1f},"
                     f" wait {r['wait_us_median']:.1f})" for r in ax),
        "    upstream design                : see (d), measured side by side",
        "",
        "(b) bytes per rank                resident  replicated     floor  owned slots",
    ]
    for key in ("hooks_hidden", "hidden"):
        for r, pr in enumerate(ranks):
            m = pr[key]["memory"]
            w = pr[key]["weight"]
            lines.append(
                f"    L={m['num_layers']} {w[0]}x{w[1]} k={m['prefetch_step']} rank {r}"
                f" {m['resident_bytes']:>10} {m['replicated_bytes']:>11}"
                f" {m['floor_bytes']:>9.0f} {m['owned_layers']:>6} {m['slots']:>5}"
            )
    c = [pr["hidden"] for pr in ranks]
    lines += [
        "",
        f"(c) {c[0]['layers']} layers, weight {c[0]['weight']} fp32, tokens {c[0]['tokens']},"
        f" rest-of-layer matmul {c[0]['filler_matmul']} (~{c[0]['filler_ms_per_layer']:.2f} ms);"
        " ms per pass (best of rounds), ratio to replicated",
    ]
    for name in c[0]["ms_per_pass_best"]:
        lines.append(
            f"    {name:<18}"
            + "  ".join(f"rank {r}: {cr['ms_per_pass_best'][name]:7.2f} ms x"
                        f"{cr['ratio_best'][name]:.3f} (median x{cr['ratio_median'][name]:.3f})"
                        for r, cr in enumerate(c))
        )
    lines.append(f"    outputs identical to replicated: {c[0]['outputs_identical']}")
    return "\n".join(lines) + "\n"


def _spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": list(values)}


def _sbs_summary(runs, args) -> dict:
    """Per-layer times (max over ranks) and ours/upstream ratios per run."""

    def per_layer(ranks, mode, name):
        return max(r["us_per_layer"][mode][name]["median"] for r in ranks)

    modes = ("bare", "compute")
    pairs = {"equal_step": [(s, s) for s in args.upstream_steps if s in args.ours_steps],
             "equal_buffers": [(s + 1, s) for s in args.upstream_steps
                               if s + 1 in args.ours_steps]}
    times = {impl: {mode: {} for mode in modes} for impl in ("ours", "upstream")}
    for impl, names in (("ours", [f"k{k}" for k in args.ours_steps]),
                        ("upstream", [f"s{s}" for s in args.upstream_steps])):
        for mode in modes:
            for name in ["replicated"] + names:
                times[impl][mode][name] = _spread(
                    [per_layer(run[impl], mode, name) for run in runs])
    ratios = {}
    for kind, kind_pairs in pairs.items():
        ratios[kind] = {}
        for mode in modes:
            for k, s in kind_pairs:
                ratios[kind][f"{mode}:k{k}/s{s}"] = _spread(
                    [per_layer(run["ours"], mode, f"k{k}")
                     / per_layer(run["upstream"], mode, f"s{s}") for run in runs])
    # drift check: the replicated loop is the same code in both worlds
    drift = {mode: _spread([per_layer(run["ours"], mode, "replicated")
                            / per_layer(run["upstream"], mode, "replicated") for run in runs])
             for mode in modes}
    memory = {}
    for impl in ("ours", "upstream"):
        ranks = runs[0][impl]
        for name in ranks[0]["memory"]:
            memory[f"{impl}:{name}"] = [
                {key: r["memory"][name][key] for key in
                 ("resident_bytes", "per_layer_bytes", "owned_layers", "slots")}
                for r in ranks]
    identical = {impl: all(all(r["outputs_identical"].values()) for run in runs
                           for r in run[impl]) for impl in ("ours", "upstream")}
    return {"us_per_layer": times, "ratios": ratios, "replicated_ratio_ours_world": drift,
            "memory_per_rank": memory, "outputs_identical": identical,
            "compute_us_per_layer": _spread([r["compute_us_per_layer"] for run in runs
                                             for impl in ("ours", "upstream")
                                             for r in run[impl]]),
            "sync_bcast_us": _spread([r["sync_bcast_us"] for run in runs
                                      for impl in ("ours", "upstream") for r in run[impl]])}


def _fmt(sp, digits=0) -> str:
    return (f"{sp['median']:.{digits}f} [{sp['min']:.{digits}f}-{sp['max']:.{digits}f}]")


def _sbs_table(res) -> str:
    args, sm = res["args"], res["side_by_side"]["summary"]
    D, H, I, T = args["sbs_dim"], args["sbs_hidden"], args["sbs_inter"], args["tokens"]
    runs = res["side_by_side"]["runs"]
    lines = [
        f"(d) side by side with the upstream seed, each in its own 2-rank world; "
        f"{len(runs)} runs, order alternating (run 0: {' then '.join(runs[0]['order'])})",
        f"    o_proj {D}x{D} fp32, {args['layers']} layers, {T} tokens, "
        f"{args['sbs_passes']} (bare) / {args['compute_passes']} (compute) passes x "
        f"{args['sbs_rounds']} rounds per configuration and run",
        f"    compute mode per layer: attention [{T},{H}]x[{H},{H}] before o_proj, MLP "
        f"[{T},{H}]x[{H},{I}] + [{T},{I}]x[{I},{H}] after it: {_fmt(sm['compute_us_per_layer'])} us"
        f" alone; one synchronous {D * D * 4 // 1024} KiB gloo broadcast: "
        f"{_fmt(sm['sync_bcast_us'])} us",
        "    upstream calls reach_layer before the attention stand-in (where its MLA calls it);"
        " ours prefetches after the o_proj",
        "",
        "    resident bytes per rank (rank 0 / rank 1), in layers of "
        f"{D * D * 4} B   [ring buffers allocated]",
    ]
    for name, ranks in sm["memory_per_rank"].items():
        lines.append(
            f"      {name:<12}"
            + " / ".join(f"{r['resident_bytes']:>7} B = "
                         f"{r['resident_bytes'] / r['per_layer_bytes']:.0f}"
                         f" ({r['owned_layers']} owned + {r['slots']} buffers)" for r in ranks))
    lines += ["", "    us per layer (max over ranks), median [min-max] over runs"]
    for impl, modes in sm["us_per_layer"].items():
        for mode, names in modes.items():
            lines.append(f"      {impl:<9}{mode:<8}" + "  ".join(
                f"{name.replace('replicated', 'repl')} {_fmt(sp)}" for name, sp in names.items()))
    lines += ["", "    ratio ours/upstream per-layer time, per run: median [min-max]"]
    for kind, table in sm["ratios"].items():
        for key, sp in table.items():
            lines.append(f"      {kind:<14}{key:<16}{_fmt(sp, 3)}   runs: "
                         + " ".join(f"{v:.3f}" for v in sp["values"]))
    drift = sm["replicated_ratio_ours_world"]
    lines.append("      replicated loop, ours' world / upstream's world (drift check): "
                 + ", ".join(f"{m} {_fmt(sp, 3)}" for m, sp in drift.items()))
    lines.append(f"    outputs identical to replicated: {sm['outputs_identical']}")
    return "\n".join(lines) + "\n"


def _table(res) -> str:
    parts = [f"o_shared benchmark - {res['machine']}, gloo, 2 ranks, 1 torch thread/rank\n"]
    if "per_rank" in res:
        parts.append(_core_table(res).split("\n", 2)[2])
    if "side_by_side" in res:
        parts.append(_sbs_table(res))
    return "\n".join(parts)


def _steps(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/bench_shared_weight.json")
    ap.add_argument("--parts", default="core,sbs",
                    help="core = (a)-(c) in one world; sbs = (d) side by side with the seed")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prefetch-step", type=int, default=1)
    ap.add_argument("--dim", type=int, default=256, help="(c) square weight size")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--filler", type=int, default=1024,
                    help="(c) rest-of-layer matmul [tokens,F]x[F,F]")
    ap.add_argument("--hook-filler", type=int, default=256,
                    help="(a) rest-of-layer matmul [256,F]x[F,F]")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", default=str(DEFAULT_SEED), help="(d) the upstream seed file")
    ap.add_argument("--runs", type=int, default=5,
                    help="(d) alternating runs; each run = one world per implementation")
    ap.add_argument("--ours-steps", type=_steps, default=[0, 1, 2, 3])
    ap.add_argument("--upstream-steps", type=_steps, default=[0, 1, 2])
    ap.add_argument("--sbs-dim", type=int, default=64, help="(d) square o_proj size")
    ap.add_argument("--sbs-hidden", type=int, default=256, help="(d) compute: hidden size")
    ap.add_argument("--sbs-inter", type=int, default=512, help="(d) compute: MLP size")
    ap.add_argument("--passes", "--sbs-passes", dest="sbs_passes", type=int, default=60,
                    help="(d) passes per timing, bare mode")
    ap.add_argument("--compute-passes", type=int, default=20,
                    help="(d) passes per timing, compute mode")
    ap.add_argument("--sbs-rounds", type=int, default=5)
    ap.add_argument("--sbs-warmup", type=int, default=10)
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.perf_counter()
    res = {
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu_model_name()})",
        "backend": "gloo",
        "args": vars(args),
    }
    if "core" in parts:
        per_rank = run_distributed(_worker, 2, args, timeout=600)
        res["per_rank"] = per_rank
        res["summary"] = {
            "ops_only_us_per_layer": max(p["ops_only"]["ops_us_per_layer"] for p in per_rank),
            "hook_us_median_hidden": max(p["hooks_hidden"]["hook_us_median"] for p in per_rank),
            "hook_us_median_exposed": max(p["hooks_exposed"]["hook_us_median"] for p in per_rank),
            "hidden_ratio_best": {
                n: max(p["hidden"]["ratio_best"][n] for p in per_rank)
                for n in per_rank[0]["hidden"]["ratio_best"]
            },
        }
    if "sbs" in parts:
        runs = []
        for i in range(args.runs):
            order = ["ours", "upstream"] if i % 2 == 0 else ["upstream", "ours"]
            run = {"order": order}
            for impl in order:  # a fresh 2-process world for each implementation
                run[impl] = run_distributed(_sbs_worker, 2, args, impl, timeout=600)
            runs.append(run)
            print(f"(d) run {i + 1}/{args.runs} done ({' then '.join(order)}, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
        res["side_by_side"] = {"runs": runs, "summary": _sbs_summary(runs, args)}
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    text = _table(res)
    out.with_suffix(".txt").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
