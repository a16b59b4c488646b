"""DeepSeek-V3's real attention dimensions at TP2 bf16: memory per worker and
o_shared's broadcast against o_proj's compute.

    .venv/bin/python benchmarks/bench_real_dims.py --out results/bench_real_dims.json

A few-layer model with DeepSeek-V3's attention shapes (hidden 7168, 128 heads,
v_head_dim 128, q_lora_rank 1536, kv_lora_rank 512, qk_nope/rope 128/64, so
o_proj is 16384 -> 7168 = 224 MiB per layer in bf16) and a small vocabulary,
small experts and a small dense MLP is written once as a seeded bf16
safetensors checkpoint (transformers' own class, like the tiny models).

Phases (``--phase``, default ``all``; each run merges into ``--out``):

``engines``  one vLLM CPU engine per configuration (plain TP2, FlashComm2 k=1
             replicated, FlashComm2 + o_shared), each in a fresh process, with
             a worker class that records ``/proc/self/status`` around
             ``load_model``.  Reported per worker: RSS before load, peak RSS up
             to the end of load (VmHWM read right after ``load_model``), peak
             over the whole start-up (+ profiling run + KV cache), and the
             steady o_proj bytes, measured two ways:
             - tensor storage behind the o_proj parameters
               (``models/introspect.py``; zero for vLLM CPU's oneDNN-packed
               plain/replicated layers, whose parameters are left empty);
             - anonymous RSS released when the o_proj state is dropped at the
               end (parameters, oneDNN handles, o_shared buffers): works for
               all three layouts, page-granular.
             Both are compared with the capacity planner
             (``tools.planner.model.plan`` -> ``memory.stages``) for the same config.
``timing``   a separate 2-rank gloo world (vLLM parallel state): one o_proj
             (7168 x 16384 bf16) per layer in an o_shared series with prefetch
             step 0, so every ``wait`` is one synchronous broadcast of a whole
             layer; next to it the layer's matmul [T, 16384] x W^T through the
             same layer (``F.linear``, the o_shared path), through vLLM's
             oneDNN dispatch (plain / replicated layers) and, for plain TP, the
             [T, 8192] half shard; T in ``--tokens``; medians of ``--repeats``.

CPU/gloo timings do not predict NPU/HCCL ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _real_dims_model import (CONFIGS, MIB, PREFETCH_STEP, TP, build_checkpoint,
                              checkpoint_dir)
from _real_dims_probes import probe_worker, release_oproj
from _real_dims_timing import run_timing
from _world import HERE, ROOT, child_env, machine_line, write_results


# --------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------


def engine_child(spec_path: str, out_path: str) -> None:
    """One engine in this (fresh) process; writes the workers' probes."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    from vllm_ascend_ext.cpu_attention import cpu_attention_backend

    model = spec["model"]
    kwargs = dict(model=model, tensor_parallel_size=TP, dtype="bfloat16", enforce_eager=True,
                  max_model_len=256, max_num_seqs=4, seed=0,
                  distributed_executor_backend="mp",
                  worker_cls="_real_dims_probes.LoadProbeWorker")
    backend = cpu_attention_backend(model, "bfloat16")  # stated, not left to the CPU model
    if backend:
        kwargs["attention_backend"] = backend
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    init_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (16, 24)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    probes = llm.collective_rpc(probe_worker)
    released = llm.collective_rpc(release_oproj)
    Path(out_path).write_text(json.dumps({
        "attention_backend": backend, "init_seconds": init_s, "generate_seconds": gen_s,
        "generated": [list(o.outputs[0].token_ids) for o in outs],
        "workers": probes, "release": released,
    }))
    os._exit(0)  # skip engine teardown; the parent only needs the file


def run_engine(model: Path, key: str, timeout: int) -> dict:
    import tempfile

    env = child_env(TP, CONFIGS[key][1])
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), str(ROOT), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as td:
        spec, out = Path(td) / "spec.json", Path(td) / "out.json"
        spec.write_text(json.dumps({"model": str(model)}))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_engine",
                               str(spec), str(out)], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"engine {key} failed (rc={proc.returncode}):\n"
                               + (proc.stdout + proc.stderr)[-6000:])
        data = json.loads(out.read_text())
    data["wall_seconds"] = time.perf_counter() - t0
    data["config"] = CONFIGS[key][0]
    data["flags"] = CONFIGS[key][1]
    return data


# --------------------------------------------------------------------------
# planner
# --------------------------------------------------------------------------


def planner_figures(model: Path, tokens) -> dict:
    """The capacity planner's per-rank o_proj bytes for this checkpoint at TP2, k=1."""
    from vllm_ascend_ext.tools.planner import model as planner
    from vllm_ascend_ext.tools.planner.shapes import load_model_shape

    shape = load_model_shape(str(model))
    p = planner.plan(shape, planner.PlanInputs(tp=TP, otp_size=1, prefetch_step=PREFETCH_STEP,
                                               weight_dtype="bf16", tokens=tuple(tokens)))
    st = p["memory"]["stages"][0]
    return {
        "function": "vllm_ascend_ext.tools.planner.model.plan -> memory.stages[0]",
        "per_layer_bytes": p["layout"]["per_layer_bytes"],
        "plain": [st["plain_tp_bytes"]] * TP,
        "fc2": [st["replicated_bytes"]] * TP,
        "oshared": [r["resident_bytes"] for r in st["ranks"]],
        "oshared_owned_slots": [[r["owned_layers"], r["slots"]] for r in st["ranks"]],
        "upstream_ring_bytes": st["upstream_bytes"],
        "floor_bytes": st["floor_bytes"],
        "plan": p,
    }


def compare(engines: dict, plan: dict) -> dict:
    """Measured vs planned bytes, per config and rank."""
    rows = {}
    for key, eng in engines.items():
        per_rank = []
        for r in range(TP):
            planned = plan[key][r]
            w = next(x for x in eng["workers"] if x["rank"] == r)
            rel = next(x for x in eng["release"] if x["rank"] == r)
            storage = w["introspect"]["o_proj_storage_bytes"]
            freed = rel["freed_anon_bytes"]
            per_rank.append({
                "rank": r, "planned": planned,
                "tensor_storage": storage, "storage_exact": storage == planned,
                "freed_on_release": freed, "freed_exact": freed == planned,
                "freed_minus_planned": freed - planned,
            })
        rows[key] = per_rank
    return rows




# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def _m(v) -> str:
    return "-" if v is None else f"{v / MIB:,.1f}"


def table(res: dict) -> str:
    ck = res.get("checkpoint", {})
    lines = [
        f"bench_real_dims - {res['machine']}",
        f"vLLM {res.get('vllm')} CPU, TP{TP}, bf16, enforce_eager; gloo; "
        f"checkout {res.get('git_head')}",
        f"model: {res.get('model')} ({ck.get('parameters', 0) / 1e9:.2f} B params, "
        f"{ck.get('safetensors_bytes', 0) / MIB:,.0f} MiB safetensors); "
        f"{res.get('layers')} layers, hidden 7168, 128 heads x v_head_dim 128, "
        "q_lora 1536, kv_lora 512; o_proj 16384 x 7168 bf16 = 224 MiB per layer",
    ]
    eng, cmp_, plan = res.get("engines", {}), res.get("comparison", {}), res.get("planner")
    if eng:
        lines += ["", "(1) memory per worker, MiB (rank 0 / rank 1)",
                  f"{'config':<28} {'load s':>7} {'RSS pre-load':>15} {'peak to end of load':>21} "
                  f"{'anon (sampled)':>19} {'file (sampled)':>17} {'anon after load':>17} "
                  f"{'peak start-up':>19} {'steady RSS':>19}"]
        for key in CONFIGS:
            if key not in eng:
                continue
            ws = sorted(eng[key]["workers"], key=lambda w: w["rank"])
            f = lambda g: " / ".join(g(w) for w in ws)  # noqa: E731
            lines.append(
                f"{CONFIGS[key][0]:<28} {f(lambda w: format(w['load']['seconds'], '.0f')):>7} "
                f"{f(lambda w: _m(w['load']['before']['VmRSS'])):>15} "
                f"{f(lambda w: _m(w['load']['after']['VmHWM'])):>21} "
                f"{f(lambda w: _m(w['load'].get('sampled_peak', {}).get('RssAnon'))):>19} "
                f"{f(lambda w: _m(w['load'].get('sampled_peak', {}).get('RssFile'))):>17} "
                f"{f(lambda w: _m(w['load']['after']['RssAnon'])):>17} "
                f"{f(lambda w: _m(w['steady']['VmHWM'])):>19} "
                f"{f(lambda w: _m(w['steady']['VmRSS'])):>19}")
        lines += ["", "    peak to end of load = VmHWM read right after load_model (anon + file-backed "
                  "safetensors pages mapped while loading);",
                  "    anon / file (sampled) = highest RssAnon / RssFile seen every 10 ms during load_model; "
                  "peak start-up = VmHWM after start-up, which adds the profiling run and "
                  "the 1 GiB KV cache;",
                  "    steady RSS = after start-up and a short generate",
                  "",
                  "(2) steady o_proj bytes per rank: measured vs planner "
                  f"({plan['function'] if plan else 'planner'})",
                  f"{'config':<28} {'rank':>4} {'planner':>13} {'RSS freed on release':>21} "
                  f"{'tensor storage':>15}  verdict"]
        for key in CONFIGS:
            for row in cmp_.get(key, []):
                st, fr, pl = row["tensor_storage"], row["freed_on_release"], row["planned"]
                if st:
                    verdict = ("tensor storage = planner EXACTLY" if row["storage_exact"]
                               else f"tensor storage != planner by {st - pl:+,} B")
                else:
                    verdict = "no tensor storage (oneDNN-packed)"
                verdict += ("; RSS freed = planner EXACTLY" if row["freed_exact"] else
                            f"; RSS freed - planner = {row['freed_minus_planned']:+,} B "
                            f"({row['freed_minus_planned'] / pl * 100:+.3f} %)")
                lines.append(f"{CONFIGS[key][0]:<28} {row['rank']:>4} {pl:>13,} {fr:>21,} "
                             f"{st:>15,}  {verdict}")
        if plan:
            lines.append(f"    planner: upstream ring {_m(plan['upstream_ring_bytes'])} MiB, "
                         f"floor {_m(plan['floor_bytes'])} MiB; o_shared owned+slots per rank "
                         f"{plan['oshared_owned_slots']}")
    tm = res.get("timing")
    if tm:
        pr = tm["per_rank"]
        lines += ["", f"(3) per layer, o_shared broadcast vs o_proj compute, ms (median of "
                  f"{tm['repeats']}; rank 0 / rank 1; 1 thread per rank)",
                  f"    weight {tm['weight'][0]} x {tm['weight'][1]} bf16 = "
                  f"{pr[0]['per_layer_bytes']:,} B per layer"]
        for p in sorted(pr[0]["broadcast_ms"], key=int):
            lines.append(f"    layer {p} (owner rank {pr[0]['broadcast_ms'][p]['owner']}): "
                         "o_shared broadcast " + " / ".join(
                             f"{r['broadcast_ms'][p]['median']:.1f}" for r in pr))
        lines.append("    bare gloo dist.broadcast of the same bytes: " + " / ".join(
            f"{r['bare_broadcast_ms']['median']:.1f}" for r in pr))
        bc = statistics.median(r["broadcast_ms"][p]["median"] for r in pr
                               for p in r["broadcast_ms"])
        lines += ["", f"    {'T':>5} {'o_shared layer':>17} {'F.linear':>17} {'oneDNN full':>17} "
                  f"{'oneDNN TP half':>17} {'broadcast/compute':>18}"]
        for T in tm["tokens"]:
            key = str(T) if str(T) in pr[0]["compute_ms"] else T
            c = [r["compute_ms"][key] for r in pr]
            cell = lambda n: " / ".join(f"{x[n]['median']:.1f}" for x in c)  # noqa: E731
            osl = statistics.median(x["o_shared_layer"]["median"] for x in c)
            lines.append(f"    {T:>5} {cell('o_shared_layer'):>17} {cell('F.linear'):>17} "
                         f"{cell('onednn_full'):>17} {cell('onednn_tp_shard'):>17} "
                         f"{bc / osl:>17.1f}x")
        lines.append("    broadcast/compute = median o_shared broadcast per layer / median "
                     "o_shared layer matmul")
    return "\n".join(lines) + "\n"


def write(res: dict, out: Path, final_copy: bool) -> str:
    text = table(res)
    write_results(out, res, text)
    if final_copy:
        shutil.copyfile(out, "/tmp/bench_real_dims_final.json")
        shutil.copyfile(out.with_suffix(".txt"), "/tmp/bench_real_dims_final.txt")
    return text


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--_engine":
        engine_child(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results/bench_real_dims.json"))
    ap.add_argument("--phase", choices=("all", "checkpoint", "engines", "timing", "report"),
                    default="all")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--layers", type=int, default=4, help="hidden layers of the checkpoint")
    ap.add_argument("--model-dir", help="checkpoint folder (default: the tiny-model cache)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--timing-layers", type=int, default=2,
                    help="o_proj layers in the timing world's series (one per rank)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--final-copy", action="store_true",
                    help="also copy the results to /tmp/bench_real_dims_final.{json,txt}")
    args = ap.parse_args(argv)

    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() and args.phase != "all" else {}
    import vllm

    res.update({
        "machine": machine_line(),
        "vllm": vllm.__version__, "layers": args.layers,
        "note": "CPU/gloo figures; they do not predict NPU/HCCL ones.",
    })
    if args.phase != "report":
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        res.setdefault("git_head", {})[args.phase] = head or None
    model = checkpoint_dir(args)
    res["model"] = str(model)
    if args.phase in ("all", "checkpoint", "engines"):
        res["checkpoint"] = build_checkpoint(model, args.layers)
        print(f"checkpoint {model}: {res['checkpoint']['parameters']:,} params", flush=True)
    if args.phase in ("all", "engines"):
        engines = res.setdefault("engines", {})
        for key in args.configs:
            engines[key] = run_engine(model, key, args.timeout)
            print(f"{CONFIGS[key][0]}: init {engines[key]['init_seconds']:.0f} s, "
                  f"generated {engines[key]['generated']}", flush=True)
            write(res, out, False)
    if args.phase in ("all", "timing"):
        res["timing"] = run_timing(args)
    if "checkpoint" in res:
        res["planner"] = planner_figures(model, args.tokens)
        res["comparison"] = compare(res.get("engines", {}), res["planner"])
    text = write(res, out, args.final_copy)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
