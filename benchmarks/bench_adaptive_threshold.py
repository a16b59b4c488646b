"""Where adaptive FlashComm2 should switch: o_proj time per call, both sides, by token count.

    .venv/bin/python benchmarks/bench_adaptive_threshold.py --out results/bench_adaptive_threshold.json

One FlashComm2 o_proj (k=1) on a real 2-rank gloo world built through vLLM's
parallel state, timed on each side of the switch for the same input: the
FlashComm2 side (pad, all-to-all, full-weight matmul, all-gather) and the
plain row-parallel side (column view of the same weight, vLLM's TP
all-reduce). Reports, per token count, the median time of each and their
ratio, and the break-even: the largest token count up to which the
row-parallel side is never slower. ``DEFAULT_ADAPTIVE_TOKENS`` in
``vllm_ascend_ext/config.py`` comes from this run (docs/flashcomm2.md).

Defaults are the ``small`` throughput preset's o_proj (Qwen3-shaped, 16 heads
x 64 = 1024 -> hidden 1024, fp32), the model ``bench_throughput.py`` runs.
CPU/gloo figures do not predict NPU/HCCL ones: run it where you deploy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _world import ROOT, machine_line, run_world, write_results

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _worker(rank, world_size, a, h, dtype_name, tokens, repeats):
    import torch

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import init_flashcomm2_groups
    from vllm_ascend_ext.models.flashcomm2_install import flashcomm2_o_proj_for
    from vllm_ascend_ext.ops.resident_slice import attach_resident_slice

    dtype = getattr(torch, dtype_name)
    cfg = FlashComm2Config(1, False, 1, adaptive_tokens=1)
    init_flashcomm2_groups(cfg, dp_lockstep=False)
    name = "model.layers.0.self_attn.o_proj"
    with set_current_vllm_config(VllmConfig()):
        # FlashComm2 alone, as the model install builds it: plain TP's o_proj
        # kept for the small side.
        old = RowParallelLinear(a, h, bias=False, params_dtype=dtype, prefix=name)
        layer = flashcomm2_o_proj_for(old, cfg, name)
        attach_resident_slice(layer, old)
    g = torch.Generator().manual_seed(0)
    layer.weight.weight_loader(layer.weight, (torch.randn(h, a, generator=g) * 0.02).to(dtype))
    for module in layer.modules():  # vLLM's pass: the layer, then its slice
        module.quant_method.process_weights_after_loading(module)
    route = "resident slice (vLLM's RowParallelLinear)"
    a_local = a // world_size
    rows = []
    for T in tokens:
        x = torch.randn(T, a_local, generator=g).to(dtype)
        sides = {"flashcomm2": lambda: layer.forward_flashcomm2(x, False)[0],
                 "row_parallel": lambda: layer.forward_row_parallel(x, False)}
        for fn in sides.values():  # warm-up
            fn()
        times = {name: [] for name in sides}
        for _ in range(repeats):
            for name, fn in sides.items():  # interleaved: drift hits both sides
                torch.distributed.barrier()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        rows.append({"tokens": T, **{f"{n}_us": statistics.median(v) * 1e6
                                     for n, v in times.items()}})
    return {"rows": rows, "small_side_route": route}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=int, default=1024, help="o_proj input features (heads x dim)")
    ap.add_argument("--h", type=int, default=1024, help="hidden size (o_proj output)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "results/bench_adaptive_threshold.json"))
    args = ap.parse_args(argv)

    per_rank = run_world(_worker, 2, args.a, args.h, args.dtype, tuple(args.tokens),
                         args.repeats, timeout=1800)
    rows = []
    for i, T in enumerate(args.tokens):
        fc2 = max(r["rows"][i]["flashcomm2_us"] for r in per_rank)
        rp = max(r["rows"][i]["row_parallel_us"] for r in per_rank)
        rows.append({"tokens": T, "flashcomm2_us": fc2, "row_parallel_us": rp,
                     "row_parallel_over_flashcomm2": rp / fc2})
    break_even = 0
    for r in rows:
        if r["row_parallel_us"] > r["flashcomm2_us"]:
            break
        break_even = r["tokens"]
    result = {
        "o_proj": {"a": args.a, "h": args.h, "dtype": args.dtype, "tp": 2, "k": 1},
        "small_side_route": per_rank[0]["small_side_route"],
        "repeats": args.repeats,
        "machine": machine_line(),
        "rows": rows,
        "break_even_tokens": break_even,
    }
    lines = [f"o_proj {args.a} -> {args.h} {args.dtype}, TP2 k=1, {result['machine']}; "
             f"median of {args.repeats}, slower rank",
             "| tokens | FlashComm2 µs | row-parallel µs | row-parallel / FlashComm2 |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['flashcomm2_us']:.0f} | {r['row_parallel_us']:.0f} | "
                     f"{r['row_parallel_over_flashcomm2']:.2f} |")
    lines.append(f"break-even: row-parallel is never slower up to {break_even} tokens")
    text = "\n".join(lines)
    write_results(args.out, result, text, suffix=".md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
