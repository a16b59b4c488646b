"""Part (d) of ``bench_shared_weight.py``: o_shared side by side with the
upstream seed (``upstream_seed.py`` loads it).

Each implementation runs in its OWN 2-rank world (separate processes), in
``--runs`` alternating pairs (ours first in even runs, upstream first in odd
ones, to cancel drift). Both time the same L-layer loop of fp32 o_projs,
"bare" (o_proj + tanh only: nothing to overlap) and "compute" (an
attention-sized matmul before each o_proj and a two-matmul MLP after it).
``run_side_by_side`` returns the raw runs and their summary; ``sbs_table``
renders it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from _oproj_layers import load_and_finalise, make_layers
from _world import run_world, with_tp_group


def _ours_build(group, args, k):
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    D = args.sbs_dim
    layers = make_layers(0, args.layers, D, D, hooks_inside=True)
    series = SharedWeightSeries(f"sbs-ours-k{k}", group, k)
    for layer in layers:
        series.add_layer(layer)
    load_and_finalise(layers, D, D)  # vLLM's post-load pass finalises the series
    return layers, series.synchronize, series.memory_report().__dict__, series.close


def _seed_build(seed, group, args, s):
    """The seed's documented life cycle: register, load, post-process."""
    D = args.sbs_dim
    layers = make_layers(0, args.layers, D, D, hooks_inside=True)
    name = f"sbs-seed-s{s}"
    for layer in layers:
        seed.register_layer_to_shared_weight_series(name, group, layer, s)
    load_and_finalise(layers, D, D)  # the seed made both steps no-ops for its layers
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
    configs = {"replicated": (make_layers(0, L, D, D, hooks_inside=True), None)}
    load_and_finalise(configs["replicated"][0], D, D)
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
    return with_tp_group(_bench_side_by_side, args, impl)


def run_side_by_side(args, t0: float) -> dict:
    """``args.runs`` alternating pairs of worlds, one per implementation."""
    runs = []
    for i in range(args.runs):
        order = ["ours", "upstream"] if i % 2 == 0 else ["upstream", "ours"]
        run = {"order": order}
        for impl in order:  # a fresh 2-process world for each implementation
            run[impl] = run_world(_sbs_worker, 2, args, impl, timeout=600)
        runs.append(run)
        print(f"(d) run {i + 1}/{args.runs} done ({' then '.join(order)}, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    return {"runs": runs, "summary": _sbs_summary(runs, args)}


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


def sbs_table(res) -> str:
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
