"""End-to-end throughput: plain TP vs FlashComm2 vs FlashComm2 + o_shared vs adaptive.

Runs vLLM's own benchmark (``vllm bench throughput``, random dataset) on the
same checkpoint for every configuration and workload, changing only the env
flags, and writes a table of tokens/s with ratios to plain TP plus the o_proj
bytes per rank each configuration holds. ``--rounds N`` repeats the whole
sweep N times, configurations interleaved, and reports the median with the
min-max spread of each ratio.

Workloads: ``decode`` (short prompts, long outputs: decode steps of
``--num-prompts`` tokens) and ``prefill`` (long prompts, short outputs).

    .venv/bin/python benchmarks/bench_throughput.py --preset small --tp 2 \
        --out results/bench_throughput.json

CPU/gloo timings say nothing about NPU/HCCL ones: on a 2-core CPU the
collectives are memcpy through shared memory and compute dominates.  This
script is what a user runs on Ascend (with ``--model`` pointing at a real
checkpoint and without the CPU env), where the numbers mean something.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _world import (CONTROL, ROOT, bracketed_cell, bracketed_ratios, child_env, machine_line,
                    write_results)

PRESETS = {
    # name: (architecture, hidden layers, hidden size or None for the tiny default)
    "tiny": ("DeepseekV3ForCausalLM", 5, None),
    "small": ("Qwen3ForCausalLM", 8, 1024),
}

_FC2 = {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1"}
_OSHARED = {**_FC2, "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1"}
_ADAPTIVE = "VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS"
CONFIGS = [
    ("plain TP", {}),
    ("FlashComm2 k=1", {**_FC2, _ADAPTIVE: "0"}),
    ("FlashComm2 k=1 + o_shared", {**_OSHARED, _ADAPTIVE: "0"}),
    # the default threshold (DEFAULT_ADAPTIVE_TOKENS): the flags a user sets
    ("adaptive FlashComm2 k=1", dict(_FC2)),
    ("adaptive FlashComm2 k=1 + o_shared", dict(_OSHARED)),
    # The control: plain TP again, last in each round. Its ratio to the
    # first plain TP run is what the machine's drift and the position in the
    # round alone give; a configuration's gap means something only beyond it.
    (CONTROL, {}),
]

#: name: (input tokens, output tokens) per request
WORKLOADS = {"decode": (16, 128), "prefill": (512, 4)}


def _model_dir(args) -> str:
    if args.model:
        return args.model
    from vllm_ascend_ext.tools.tiny_models.factory import default_cache_root, make_tiny_checkpoint

    arch, layers, hidden = PRESETS[args.preset]
    out = default_cache_root() / f"bench-{args.preset}-{arch}-L{layers}-H{hidden}"
    # Random weights: a step's time does not depend on their values, and
    # training the larger presets would only slow the build.
    return str(make_tiny_checkpoint(arch, out, num_hidden_layers=layers, hidden_size=hidden,
                                    train=False))


def _oproj_bytes(model: str, tp: int, flags: dict) -> int:
    """o_proj bytes group rank 0 holds (fp32 checkpoints), from the capacity
    planner, whose figure tests/e2e/test_memory.py reads back from real
    workers (TP-shard storage) and tests/test_planner.py checks against the
    round-robin series."""
    from vllm_ascend_ext.config import parse_flashcomm2_config
    from vllm_ascend_ext.tools.planner.model import PlanInputs, plan
    from vllm_ascend_ext.tools.planner.shapes import load_model_shape

    shape = load_model_shape(model)
    L, W = shape.num_layers, shape.o_proj_in * shape.hidden_size * 4
    cfg = parse_flashcomm2_config(flags, None)
    if not cfg.enabled:
        return L * W // tp  # plain TP: a 1/TP shard of every layer
    memory = plan(shape, PlanInputs(tp=tp, weight_dtype="fp32", act_dtype="fp32",
                                    prefetch_step=cfg.prefetch_step,
                                    adaptive_tokens=cfg.adaptive_tokens,
                                    storage=cfg.oshared_storage))["memory"]
    # FlashComm2 alone: its full o_proj, plus plain TP's under the adaptive switch.
    return memory["ours_total_bytes" if cfg.oshared else "flashcomm2_bytes"]


def run_one(model: str, tp: int, env_flags: dict, args) -> dict:
    from vllm_ascend_ext.tools.local_server import vllm_cli

    env = child_env(tp, env_flags, cpu=not args.no_cpu_env)
    with tempfile.TemporaryDirectory() as td:
        out_json = Path(td) / "bench.json"
        cmd = [vllm_cli(), "bench", "throughput", "--model", model,
               "--tensor-parallel-size", str(tp), "--dataset-name", "random",
               "--random-input-len", str(args.input_len), "--random-output-len",
               str(args.output_len), "--num-prompts", str(args.num_prompts),
               "--max-model-len", str(args.input_len + args.output_len + 16),
               "--dtype", args.dtype, "--output-json", str(out_json), "--seed", "0",
               "--enforce-eager"]
        if not args.no_cpu_env:
            from vllm_ascend_ext.cpu_attention import cpu_attention_backend

            backend = cpu_attention_backend(model, args.dtype)  # never left to the CPU model
            cmd += ["--attention-backend", backend] if backend else []
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            # The engine's own traceback sits far above the client's in the
            # output: keep all of it, next to the results.
            log = Path(args.out).with_suffix(f".failed-{int(time.time())}.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"$ {' '.join(cmd)}\n{env_flags}\n--- stdout\n{proc.stdout}"
                           f"\n--- stderr\n{proc.stderr}")
            raise RuntimeError(f"{' '.join(cmd)} failed (whole output: {log}):\n"
                               f"{proc.stderr[-4000:]}")
        data = json.loads(out_json.read_text())
    data["wall_s"] = time.time() - t0
    return data


def main(argv=None) -> int:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--model", help="a real checkpoint instead of a preset")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS),
                    default=list(WORKLOADS))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-cpu-env", action="store_true", help="do not set CPU vLLM env (NPU)")
    ap.add_argument("--hosts", type=int, choices=(1, 2), default=1,
                    help="2: TP across two emulated hosts (network namespaces, root)")
    ap.add_argument("--link-rate", default="200mbit",
                    help="--hosts 2: the link's rate (tc notation)")
    ap.add_argument("--from-json", metavar="RESULTS",
                    help="--hosts 2: recompute the predictions for a saved run's "
                         "measurements instead of measuring")
    ap.add_argument("--configs", nargs="+", choices=[name for name, _ in CONFIGS],
                    help="run only these configurations (plain TP, the baseline, always runs)")
    ap.add_argument("--out", default=str(ROOT / "results/bench_throughput.json"))
    args = ap.parse_args(argv)
    configs = [c for c in CONFIGS if not args.configs or c[0] in args.configs
               or c is CONFIGS[0]]
    if args.hosts == 2:
        from two_host_throughput import main_two_hosts

        return main_two_hosts(_model_dir(args), configs, WORKLOADS, args, _oproj_bytes)

    from vllm_ascend_ext.config import DEFAULT_ADAPTIVE_TOKENS
    model = _model_dir(args)
    samples: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for workload in args.workloads:
            args.input_len, args.output_len = WORKLOADS[workload]
            for name, flags in configs:
                data = run_one(model, args.tp, flags, args)
                samples.setdefault((workload, name), []).append(data["tokens_per_second"])
                print(f"round {rnd} {workload} {name}: {data['tokens_per_second']:.1f} tok/s",
                      flush=True)
    rows = []
    for workload in args.workloads:
        base = samples[(workload, CONFIGS[0][0])]
        for name, flags in configs:
            tps = samples[(workload, name)]
            ratios = [t / b for t, b in zip(tps, base)]  # within a round
            control = samples.get((workload, CONTROL))
            rows.append({
                "workload": workload, "input_len": WORKLOADS[workload][0],
                "output_len": WORKLOADS[workload][1], "config": name, "flags": flags,
                "tokens_per_s": statistics.median(tps), "tokens_per_s_runs": tps,
                "ratio_to_plain_tp": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "ratio_to_bracketing_plain_tp": None if control is None
                else bracketed_ratios(tps, base, control),
                "o_proj_bytes_per_rank": _oproj_bytes(model, args.tp, flags),
            })
    result = {
        "model": model, "tp": args.tp, "num_prompts": args.num_prompts, "dtype": args.dtype,
        "rounds": args.rounds, "adaptive_tokens_default": DEFAULT_ADAPTIVE_TOKENS,
        "machine": machine_line(),
        "note": "CPU/gloo timings do not predict NPU/HCCL ones.",
        "rows": rows,
    }
    table = ["| workload | config | tokens/s | ratio to plain TP (median [min-max]) | "
             "ratio to the round's two plain-TP runs, per round | o_proj bytes / rank |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['workload']} ({r['input_len']} in / {r['output_len']} out) | "
                     f"{r['config']} | {r['tokens_per_s']:.1f} | {r['ratio_to_plain_tp']:.3f} "
                     f"[{r['ratio_min']:.3f}-{r['ratio_max']:.3f}] | "
                     f"{bracketed_cell(r['ratio_to_bracketing_plain_tp'])} | "
                     f"{r['o_proj_bytes_per_rank']:,} |")
    md = "\n".join(table)
    write_results(args.out, result, md, suffix=".md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
