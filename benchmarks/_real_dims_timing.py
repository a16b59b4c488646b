"""The ``timing`` phase of ``bench_real_dims.py``: a 2-rank gloo world (vLLM
parallel state) with one DeepSeek-V3-sized o_proj (7168 x 16384 bf16) per layer
in an o_shared series with prefetch step 0, so every ``wait`` is one
synchronous broadcast of a whole layer; beside it the layer's matmul through
the o_shared path (``F.linear``), through vLLM's oneDNN dispatch, and plain
TP's half shard.
"""

from __future__ import annotations

import statistics
import sys
import time

from _real_dims_model import REAL_ATTENTION, SEED, TP
from _world import run_world, with_tp_group


def _timing_worker(rank, world_size, args):
    return with_tp_group(_time_series, rank, world_size, args)


def _time_series(group, rank, world_size, args):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    a, h, L = REAL_ATTENTION["num_attention_heads"] * REAL_ATTENTION["v_head_dim"], \
        REAL_ATTENTION["hidden_size"], args.timing_layers
    dt = torch.bfloat16
    t_start = time.perf_counter()

    def log(msg):
        if rank == 0:
            print(f"[timing {time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr,
                  flush=True)

    def linear(din, idx, name="o_proj"):
        return ReplicatedLinear(din, h, bias=False, params_dtype=dt,
                                prefix=f"model.layers.{idx}.self_attn.{name}")

    def load(layer, idx, din):
        g = torch.Generator().manual_seed(SEED + idx)
        w = (torch.randn(h, din, generator=g) * 0.006).to(dt)
        layer.weight.weight_loader(layer.weight, w)

    series = SharedWeightSeries("bench-real-dims", group, prefetch_step=0)
    layers = [linear(a, i) for i in range(L)]
    for layer in layers:
        series.add_layer(layer)
    for i, layer in enumerate(layers):
        load(layer, i, a)
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)  # last one finalises
    own = rank  # position `rank` is resident here
    log("series finalised")
    # vLLM's own CPU dispatch (oneDNN), as plain / replicated layers get it
    onednn = linear(a, 100)
    load(onednn, 0, a)
    onednn.quant_method.process_weights_after_loading(onednn)
    shard = linear(a // TP, 101)  # plain TP's per-rank half of o_proj
    load(shard, 1, a // TP)
    shard.quant_method.process_weights_after_loading(shard)
    gemm = {"o_shared": getattr(layers[own], "_cpu_skip_gemm_dispatch", False),
            "onednn_weight_numel": onednn.weight.numel()}

    # (1) o_shared broadcast per layer: with step 0 every wait is one
    # synchronous broadcast of a whole layer (the owner sends).
    log("layers ready")
    x0 = torch.zeros(1, a, dtype=dt)
    for p in range(L):  # warm-up pass
        series.wait(p, x0)
    bcast = {p: [] for p in range(L)}
    group.barrier()
    for _ in range(args.repeats):
        for p in range(L):
            t0 = time.perf_counter()
            series.wait(p, x0)
            bcast[p].append(time.perf_counter() - t0)
    # the bare transport: one dist.broadcast of the same bytes
    raw = torch.empty(series.per_layer_bytes, dtype=torch.uint8)
    bare = []
    group.barrier()
    for i in range(args.repeats):
        t0 = time.perf_counter()
        dist.broadcast(raw, src=group.ranks[i % world_size], group=group.device_group)
        bare.append(time.perf_counter() - t0)
    del raw
    log("broadcasts timed")

    # (2) o_proj compute, each rank at once on its own core (as at TP2)
    compute = {}
    for T in args.tokens:
        x = torch.randn(T, a, dtype=dt) * 0.1
        xs = x[:, : a // TP].contiguous()
        fns = {
            # the layer's own matmul, without its o_shared hooks (with step 0
            # a hooked call would broadcast, and each rank times its own layer)
            "o_shared_layer": lambda: layers[own].quant_method.apply(layers[own], x),
            "F.linear": lambda: F.linear(x, layers[own].weight),
            "onednn_full": lambda: onednn(x)[0],
            "onednn_tp_shard": lambda: shard(xs)[0],
        }
        res = {}
        for name, fn in fns.items():
            fn()  # warm-up (oneDNN primitive creation)
            group.barrier()
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            res[name] = ts
        compute[T] = res
        log(f"compute timed at T={T}")
    report = series.memory_report().__dict__
    series.close()
    med = lambda v: statistics.median(v) * 1e3  # noqa: E731
    return {
        "rank": rank,
        "per_layer_bytes": report["per_layer_bytes"],
        "series_memory": report,
        "gemm": gemm,
        "broadcast_ms": {p: {"median": med(v), "min": min(v) * 1e3, "samples": len(v),
                             "owner": p % world_size} for p, v in bcast.items()},
        "bare_broadcast_ms": {"median": med(bare), "min": min(bare) * 1e3},
        "compute_ms": {T: {n: {"median": med(v), "min": min(v) * 1e3} for n, v in r.items()}
                       for T, r in compute.items()},
    }


def run_timing(args) -> dict:
    t0 = time.perf_counter()
    per_rank = run_world(_timing_worker, TP, args, timeout=args.timeout,
                         env={"OMP_NUM_THREADS": "1"})
    return {"seconds": time.perf_counter() - t0, "repeats": args.repeats,
            "tokens": list(args.tokens), "layers": args.timing_layers,
            "weight": [REAL_ATTENTION["hidden_size"],
                       REAL_ATTENTION["num_attention_heads"] * REAL_ATTENTION["v_head_dim"]],
            "dtype": "bfloat16", "threads_per_rank": 1, "per_rank": per_rank}

