"""Host time per o_proj call, each side of the adaptive switch, against vLLM's own layer.

On a 2-rank gloo world, one stack of o_proj layers per configuration, all
from the same weights, timed call by call in the same run (configurations
interleaved, median of ``--repeats``):

- ``vLLM RowParallelLinear``: vLLM's layer as vLLM processes it (on CPU the
  weight goes into a oneDNN handle);
- ``vLLM RowParallelLinear, plain weight``: the same layer with the weight
  kept a plain tensor (``F.linear``), which is what TP-shard storage keeps;
- ``o_shared, TP shards`` (the default storage) and ``o_shared, round-robin``
  (the previous default) and ``FlashComm2, no o_shared``, all with the
  adaptive switch at ``--threshold`` tokens.

Small steps (``--small`` tokens, at or below the threshold) run plain TP's
own o_proj on every configuration (the resident slice): the ratio to the
vLLM layer whose weight format that slice has (plain for TP shards, vLLM's
processed format for round-robin and FlashComm2 alone) is the host time the
switch adds; the ratio to the plain-weight layer is shown too. Large steps
(``--large``) run FlashComm2: their ratio also includes the all-to-all and
all-gather and, with o_shared, the ring. Tiny dimensions on purpose: the
matmul is small, so Python and the collectives' fixed costs dominate, as
they do for decode on an accelerator.

    .venv/bin/python benchmarks/bench_oproj_host_time.py --out results/bench_oproj_host_time.json
"""

from __future__ import annotations

import argparse
import statistics
import time

from _world import machine_line, run_world, with_tp_group, write_results

A, H, LAYERS = 256, 256, 4
CONFIGS = ("vLLM RowParallelLinear", "vLLM RowParallelLinear, plain weight",
           "o_shared, TP shards", "o_shared, round-robin", "FlashComm2, no o_shared")
#: The vLLM layer whose weight format each configuration's small side runs.
SAME_FORMAT = {"vLLM RowParallelLinear": "vLLM RowParallelLinear",
               "vLLM RowParallelLinear, plain weight": "vLLM RowParallelLinear, plain weight",
               "o_shared, TP shards": "vLLM RowParallelLinear, plain weight",
               "o_shared, round-robin": "vLLM RowParallelLinear",
               "FlashComm2, no o_shared": "vLLM RowParallelLinear"}


def _stacks(threshold: int):
    import torch
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.compat import keep_cpu_linear_weight_plain
    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import (
        get_flashcomm2_odp_group,
        get_flashcomm2_oshared_group,
    )
    from vllm_ascend_ext.models.flashcomm2_install import flashcomm2_o_proj_for, join_series
    from vllm_ascend_ext.ops.resident_slice import attach_resident_slice
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries
    from vllm_ascend_ext.ops.tp_shard.specs import shard_specs_for
    from vllm_ascend_ext.ops.tp_shard.storage import TPShardStorage

    cfg = FlashComm2Config(1, True, 1, adaptive_tokens=threshold)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(H, A, generator=g) * 0.05 for _ in range(LAYERS)]
    stacks = {name: [] for name in CONFIGS}
    tp_shard = round_robin = None
    for i, w in enumerate(weights):
        name = f"model.layers.{i}.self_attn.o_proj"

        def vllm_layer():
            return RowParallelLinear(A, H, bias=False, params_dtype=torch.float32, prefix=name,
                                     return_bias=False)

        plain, plain_weight = vllm_layer(), vllm_layer()
        method = plain_weight.quant_method  # vLLM's _cpu_skip_gemm_dispatch (or its shim)
        method.process_weights_after_loading = keep_cpu_linear_weight_plain(
            plain_weight, method.process_weights_after_loading)
        old = vllm_layer()
        shared = flashcomm2_o_proj_for(old, cfg, name)
        if tp_shard is None:
            tp_shard = TPShardStorage("bench-tp-shard", get_flashcomm2_odp_group(), 1,
                                      shard_specs_for(old))
            round_robin = SharedWeightSeries("bench-round-robin",
                                             get_flashcomm2_oshared_group(), 1)
        tp_shard.add_layer(shared, old, i)
        old_rr = vllm_layer()
        rr = flashcomm2_o_proj_for(old_rr, cfg, name)
        join_series(rr, old_rr, cfg, round_robin, i)
        old_fc2 = vllm_layer()
        fc2 = flashcomm2_o_proj_for(old_fc2, cfg, name)
        attach_resident_slice(fc2, old_fc2)  # as the model install does without o_shared
        for cfg_name, layer in zip(CONFIGS, (plain, plain_weight, shared, rr, fc2)):
            layer.weight.weight_loader(layer.weight, w)
            stacks[cfg_name].append(layer)
    for layers in stacks.values():  # vLLM's post-load pass, parents first
        for layer in layers:
            for module in layer.modules():
                module.quant_method.process_weights_after_loading(module)
    return stacks, (tp_shard, round_robin)


def _time(stacks: dict, x, iters: int) -> dict[str, tuple[float, float]]:
    """Per configuration: (host CPU time, wall time) in microseconds per o_proj
    call. Configurations alternate pass by pass, so drift hits them alike;
    host time is this thread's CPU time, which leaves out the wait for the
    peer inside a collective (on 2 cores, the larger and noisier part)."""
    cpu = {name: 0.0 for name in stacks}
    wall = {name: 0.0 for name in stacks}
    for _ in range(iters):
        for name, layers in stacks.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            for layer in layers:
                layer(x)
            cpu[name] += time.thread_time() - c0
            wall[name] += time.perf_counter() - w0
    calls = iters * len(next(iter(stacks.values())))
    return {name: (cpu[name] / calls * 1e6, wall[name] / calls * 1e6) for name in stacks}


def _rank(rank, world_size, threshold, small, large, iters, repeats):
    import torch

    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import (
        destroy_flashcomm2_groups,
        init_flashcomm2_groups,
    )

    def body(tp):
        init_flashcomm2_groups(FlashComm2Config(1, True, 1, adaptive_tokens=threshold),
                               dp_lockstep=False)
        try:
            stacks, stores = _stacks(threshold)
            out = {}
            for T in (small, large):
                x = torch.randn(T, A // world_size)
                _time(stacks, x, 3)  # warm-up
                runs = [_time(stacks, x, iters) for _ in range(repeats)]
                out[T] = {name: {"host_us": statistics.median(r[name][0] for r in runs),
                                 "wall_us": statistics.median(r[name][1] for r in runs)}
                          for name in stacks}
            for store in stores:
                store.close()
            return out
        finally:
            destroy_flashcomm2_groups()

    return with_tp_group(body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threshold", type=int, default=8)
    ap.add_argument("--small", type=int, default=1)
    ap.add_argument("--large", type=int, default=64)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="results/bench_oproj_host_time.json")
    args = ap.parse_args(argv)
    if not args.small <= args.threshold < args.large:
        ap.error("--small must be at most --threshold, and --large above it")
    per_rank = run_world(_rank, 2, args.threshold, args.small, args.large, args.iters,
                         args.repeats, timeout=1200)
    base = "vLLM RowParallelLinear, plain weight"
    rows, lines = [], [f"# o_proj time per call, TP=2 (gloo), {LAYERS} layers of "
                       f"{A}x{H} fp32; {machine_line()}",
                       f"# threshold {args.threshold}; median of {args.repeats} x "
                       f"{args.iters} passes, configurations alternating; rank 0 (rank 1 "
                       "in the JSON); host = the calling thread's CPU time", "",
                       "| tokens | side | configuration | host us / call | host vs vLLM "
                       "RowParallelLinear, same weight format | host vs vLLM "
                       "RowParallelLinear, plain weight | wall us / call | wall vs the "
                       "same format |",
                       "|---|---|---|---|---|---|---|---|"]
    for T, side in ((args.small, "small: plain TP"), (args.large, "large: FlashComm2")):
        times = per_rank[0][T]
        for name in CONFIGS:
            same = times[SAME_FORMAT[name]]
            row = {"tokens": T, "side": side, "config": name, **times[name],
                   "rank1": per_rank[1][T][name], "same_format": SAME_FORMAT[name],
                   "host_vs_same_format": times[name]["host_us"] / same["host_us"],
                   "wall_vs_same_format": times[name]["wall_us"] / same["wall_us"],
                   "host_vs_plain_weight": times[name]["host_us"] / times[base]["host_us"],
                   "wall_vs_plain_weight": times[name]["wall_us"] / times[base]["wall_us"]}
            rows.append(row)
            lines.append(f"| {T} | {side} | {name} | {row['host_us']:.1f} | "
                         f"{row['host_vs_same_format']:.3f} | "
                         f"{row['host_vs_plain_weight']:.3f} | {row['wall_us']:.1f} | "
                         f"{row['wall_vs_same_format']:.3f} |")
    small = {r["config"]: r["host_vs_same_format"] for r in rows if r["tokens"] == args.small}
    switch_configs = CONFIGS[2:]
    target = all(small[c] <= 1.10 for c in switch_configs)
    lines += ["", "target (each switch configuration's small side at most 1.10x the host "
                  "time of vLLM's RowParallelLinear.forward with the same weight format): "
                  f"{'met' if target else 'missed'} ("
                  + ", ".join(f"{c}: {small[c]:.3f}x" for c in switch_configs) + ")"]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, {"machine": machine_line(), "args": vars(args), "rows": rows,
                             "small_side_target_met": target}, text, suffix=".md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
