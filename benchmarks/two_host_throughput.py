"""``bench_throughput.py --hosts 2``: the same configurations and workloads,
served across two emulated hosts on a shaped link (``vllm_ascend_ext.tools.multinode``).

Per configuration one two-host ``vllm serve`` (TP across the hosts, one rank
each), then vLLM's own ``vllm bench serve`` for every workload against it,
from this machine through the loopback relay. Configurations are interleaved
over rounds. Besides tokens/s it records the bytes that crossed the link per
generated token (decode-heavy) and per prompt token (prefill-heavy), which
the step model predicts (``vllm_ascend_ext.tools.planner.step_model``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path


#: Stated, not left to vLLM's per-platform default (CPU: 2048 per rank), so
#: the step model sees the same chunking the scheduler does.
MAX_BATCHED_TOKENS = 4096
SERVER_ARGS = ["--max-model-len", "1024", "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)]


def _bench_serve(server, model: str, input_len: int, output_len: int, num_prompts: int,
                 timeout: float) -> dict:
    from vllm_ascend_ext.tools.local_server import vllm_cli

    with tempfile.TemporaryDirectory() as td:
        cmd = [vllm_cli(), "bench", "serve", "--backend", "vllm", "--base-url", server.base_url,
               "--model", model, "--tokenizer", model, "--dataset-name", "random",
               "--random-input-len", str(input_len), "--random-output-len", str(output_len),
               "--num-prompts", str(num_prompts), "--ignore-eos", "--seed", "0",
               "--save-result", "--result-dir", td, "--result-filename", "r.json",
               "--disable-tqdm"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_ASCEND_")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads((Path(td) / "r.json").read_text())


def run_two_hosts(model: str, configs: list, workloads: dict, args) -> dict:
    """``{(workload, config name): [sample, ...]}``; a sample holds tokens/s,
    the link bytes and the token counts of one ``vllm bench serve`` run."""
    from vllm_ascend_ext.tools.multinode.netns import TwoHosts
    from vllm_ascend_ext.tools.multinode.serve import TwoHostServer

    samples: dict[tuple[str, str], list[dict]] = {}
    with TwoHosts(rate=args.link_rate) as hosts:
        for rnd in range(args.rounds):
            for name, flags in configs:
                server = TwoHostServer(hosts, model, tp=args.tp, dtype=args.dtype,
                                       head_env=flags, worker_env=flags,
                                       head_args=SERVER_ARGS, worker_args=SERVER_ARGS)
                try:
                    server.start()
                    for workload in args.workloads:
                        inp, outp = workloads[workload]
                        before = hosts.counters()
                        t0 = time.time()
                        r = _bench_serve(server, model, inp, outp, args.num_prompts, 1800)
                        link = hosts.counters() - before
                        sample = {
                            "tokens_per_s": r["total_token_throughput"],
                            "duration_s": r["duration"], "wall_s": time.time() - t0,
                            "input_tokens": r["total_input_tokens"],
                            "output_tokens": r["total_output"] if "total_output" in r
                            else r["total_output_tokens"],
                            "link_bytes": link.total,
                        }
                        samples.setdefault((workload, name), []).append(sample)
                        print(f"round {rnd} {workload} {name}: {sample['tokens_per_s']:.1f} "
                              f"tok/s, link {link.total / 1e6:.1f} MB", flush=True)
                finally:
                    server.stop()
    return samples


def _rate_bytes(rate: str) -> float:
    """tc notation (``200mbit``, ``1gbit``) in bytes per second."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, mult in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * mult / 8
    raise ValueError(f"--link-rate {rate!r}: expected e.g. 200mbit or 1gbit")


def oproj_mode(flags: dict):
    """The step model's o_proj mode and adaptive threshold for a configuration's
    environment flags, read by the plugin's own parser (not from its name)."""
    from vllm_ascend_ext.config import parse_flashcomm2_config
    from vllm_ascend_ext.tools.planner.step_model import OprojMode

    from vllm_ascend_ext.oshared_storage import choose_storage

    cfg = parse_flashcomm2_config(flags, None)
    # Two hosts, TP2, one replica: the o_shared group is the TP group, and the
    # CPU checkpoints are fp32 (a method with a gather declaration).
    storage = choose_storage(cfg.oshared_storage, adaptive_tokens=cfg.adaptive_tokens,
                             oshared_group_size=2, tp_size=2, gather_spec="vLLM",
                             quant_method="UnquantizedLinearMethod").storage
    mode = OprojMode(flashcomm2=cfg.enabled, oshared=cfg.oshared,
                     adaptive=cfg.enabled and cfg.adaptive_tokens > 0, storage=storage)
    return mode, cfg.adaptive_tokens


def main_two_hosts(model: str, configs: list, workloads: dict, args, oproj_bytes) -> int:
    import statistics

    from _world import CONTROL, bracketed_cell, bracketed_ratios, machine_line, write_results

    from vllm_ascend_ext.config import DEFAULT_ADAPTIVE_TOKENS
    from vllm_ascend_ext.tools.planner.link_model import LinkModel
    from vllm_ascend_ext.tools.planner.shapes import load_model_shape
    from vllm_ascend_ext.tools.planner.step_model import (
        calibrated_compute_s,
        workload_comm,
        workload_steps,
    )

    if args.from_json:
        # Re-derive the predictions from a saved run's measurements (after a
        # change to the step model); nothing is measured again.
        saved = json.loads(Path(args.from_json).read_text())
        samples = {(r["workload"], r["config"]): r["runs"] for r in saved["rows"]}
        for key in ("link_rate", "num_prompts", "tp", "dtype", "rounds"):
            setattr(args, key, saved[key])
        args.workloads = list(dict.fromkeys(r["workload"] for r in saved["rows"]))
        measured_on = saved["machine"]
    else:
        samples = run_two_hosts(model, configs, workloads, args)
        measured_on = machine_line()
    shape = load_model_shape(model)
    dbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    link = LinkModel(rate_bytes_per_s=_rate_bytes(args.link_rate))
    rows = []
    for workload in args.workloads:
        inp, outp = workloads[workload]
        steps = workload_steps(args.num_prompts, inp, outp, max_batched_tokens=MAX_BATCHED_TOKENS)
        plain = samples[(workload, configs[0][0])]
        plain_mode, plain_threshold = oproj_mode(configs[0][1])
        plain_comm = workload_comm(shape, args.tp, steps, plain_mode, link, dbytes, dbytes,
                                   plain_threshold)
        compute = calibrated_compute_s(statistics.median(s["duration_s"] for s in plain),
                                       plain_comm)
        for name, flags in configs:
            runs = samples[(workload, name)]
            mode, threshold = oproj_mode(flags)
            comm = workload_comm(shape, args.tp, steps, mode, link, dbytes, dbytes, threshold)
            ratios = [r["tokens_per_s"] / p["tokens_per_s"] for r, p in zip(runs, plain)]
            control = samples.get((workload, CONTROL))
            bracketed = None if control is None else bracketed_ratios(
                [r["tokens_per_s"] for r in runs], [p["tokens_per_s"] for p in plain],
                [c["tokens_per_s"] for c in control])
            link_bytes = statistics.median(r["link_bytes"] for r in runs)
            per = "output_tokens" if workload == "decode" else "input_tokens"
            rows.append({
                "workload": workload, "input_len": inp, "output_len": outp, "config": name,
                "flags": flags,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "ratio_to_plain_tp": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "ratio_to_bracketing_plain_tp": bracketed,
                "link_bytes": link_bytes,
                "link_bytes_per_token": link_bytes / runs[0][per], "per": per,
                "link_bytes_ratio_to_plain_tp": link_bytes / statistics.median(
                    p["link_bytes"] for p in plain),
                "predicted_link_bytes": comm.wire_bytes,
                "predicted_ratio_to_plain_tp": (compute + plain_comm.link_seconds)
                / (compute + comm.link_seconds),
                "plain_tp_comm_share_predicted": plain_comm.link_seconds
                / (compute + plain_comm.link_seconds),
                "o_proj_bytes_per_rank": oproj_bytes(model, args.tp, flags),
                "runs": runs,
            })
    result = {"model": model, "tp": args.tp, "hosts": 2, "link_rate": args.link_rate,
              "num_prompts": args.num_prompts, "dtype": args.dtype, "rounds": args.rounds,
              "adaptive_tokens_default": DEFAULT_ADAPTIVE_TOKENS, "machine": measured_on,
              "reanalysed_from": args.from_json,
              "note": "two network namespaces on one machine, gloo over a tc-shaped veth; "
                      "the prediction takes compute from the plain-TP run of the same round set",
              "rows": rows}
    table = ["| workload | config | tokens/s | ratio to plain TP (median [min-max]) | "
             "ratio to the round's two plain-TP runs, per round | "
             "predicted ratio | link bytes / token (vs plain TP) | predicted link bytes / "
             "measured | o_proj bytes / rank |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| {r['workload']} ({r['input_len']} in / {r['output_len']} out) | {r['config']} | "
            f"{r['tokens_per_s']:.1f} | {r['ratio_to_plain_tp']:.3f} [{r['ratio_min']:.3f}-"
            f"{r['ratio_max']:.3f}] | "
            f"{bracketed_cell(r.get('ratio_to_bracketing_plain_tp'))} | "
            f"{r['predicted_ratio_to_plain_tp']:.3f} | "
            f"{r['link_bytes_per_token']:,.0f} per {r['per'].split('_')[0]} token "
            f"({r['link_bytes_ratio_to_plain_tp']:.2f}x) | "
            f"{r['predicted_link_bytes'] / max(r['link_bytes'], 1):.3f} | "
            f"{r['o_proj_bytes_per_rank']:,} |")
    md = "\n".join(table)
    write_results(args.out, result, md, suffix=".md")
    print(md)
    return 0
