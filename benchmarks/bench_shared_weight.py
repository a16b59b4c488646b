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
(d) side by side with the upstream seed (``_vs_upstream_seed.py``;
    ``upstream_seed.py`` loads the seed): each implementation runs in its
    OWN 2-rank world (separate processes), in
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
import os
import statistics
import time

from _oproj_layers import load_and_finalise, make_layers
from _world import machine_line, run_world, with_tp_group, write_results
from upstream_seed import DEFAULT_SEED
from _vs_upstream_seed import run_side_by_side, sbs_table


def _bench_hooks(group, args, filler_dim):
    """(a): time inside prefetch_after + wait per layer."""
    import torch
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    L, D = args.layers, 64
    layers = make_layers(0, L, D, D, hooks_inside=False)
    series = SharedWeightSeries(f"bench-hooks-{filler_dim}", group, args.prefetch_step)
    for layer in layers:
        series.add_layer(layer)
    load_and_finalise(layers, D, D)
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

    layers = make_layers(0, 1, 64, 64, hooks_inside=False)
    series = SharedWeightSeries("bench-ops-only", group, 0)
    series.add_layer(layers[0])
    load_and_finalise(layers, 64, 64)
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
    variants = {"replicated": make_layers(0, L, D, D, hooks_inside=True)}
    load_and_finalise(variants["replicated"], D, D)
    series = {}
    for k in sorted({args.prefetch_step, 0}):
        layers = make_layers(0, L, D, D, hooks_inside=True)
        series[k] = SharedWeightSeries(f"bench-hidden-k{k}", group, k)
        for layer in layers:
            series[k].add_layer(layer)
        load_and_finalise(layers, D, D)
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



def _core_benches(group, args):
    return {
        "ops_only": _bench_ops_only(group, args),
        "hooks_hidden": _bench_hooks(group, args, filler_dim=args.hook_filler),
        "hooks_exposed": _bench_hooks(group, args, filler_dim=0),
        "hidden": _bench_hidden(group, args),
    }


def _worker(rank, world_size, args):
    return with_tp_group(_core_benches, args)


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


def _table(res) -> str:
    parts = [f"o_shared benchmark - {res['machine']}, gloo, 2 ranks, 1 torch thread/rank\n"]
    if "per_rank" in res:
        parts.append(_core_table(res).split("\n", 2)[2])
    if "side_by_side" in res:
        parts.append(sbs_table(res))
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
        "machine": machine_line(),
        "backend": "gloo",
        "args": vars(args),
    }
    if "core" in parts:
        per_rank = run_world(_worker, 2, args, timeout=600)
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
        res["side_by_side"] = run_side_by_side(args, t0)
    res["seconds"] = time.perf_counter() - t0
    text = _table(res)
    side = write_results(args.out, res, text)
    print(text)
    print(f"wrote {args.out} and {side}")


if __name__ == "__main__":
    main()
