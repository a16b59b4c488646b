"""``bench_throughput.py --hosts 2``: the same configurations and workloads,
served across two emulated hosts on a shaped link (``vllm_ascend_ext.multinode``).

Per configuration one two-host ``vllm serve`` (TP across the hosts, one rank
each), then vLLM's own ``vllm bench serve`` for every workload against it,
from this machine through the loopback relay. Configurations are interleaved
over rounds. Besides tokens/s it records the bytes that crossed the link per
generated token (decode-heavy) and per prompt token (prefill-heavy), which
the planner's formulas predict (``planner.link_bytes_per_step``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path


def _bench_serve(server, model: str, input_len: int, output_len: int, num_prompts: int,
                 timeout: float) -> dict:
    from vllm_ascend_ext.local_server import vllm_cli

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
    from vllm_ascend_ext.multinode.netns import TwoHosts
    from vllm_ascend_ext.multinode.serve import TwoHostServer

    samples: dict[tuple[str, str], list[dict]] = {}
    with TwoHosts(rate=args.link_rate) as hosts:
        for rnd in range(args.rounds):
            for name, flags in configs:
                server = TwoHostServer(hosts, model, tp=args.tp, dtype=args.dtype,
                                       head_env=flags, worker_env=flags,
                                       head_args=["--max-model-len", "1024"],
                                       worker_args=["--max-model-len", "1024"])
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
