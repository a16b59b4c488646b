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
             (``planner.plan`` -> ``memory.stages``) for the same config.
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
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

ARCH = "DeepseekV3ForCausalLM"
MIB = 1 << 20

#: DeepSeek-V3's attention dimensions (its config.json).
REAL_ATTENTION = dict(
    hidden_size=7168,
    num_attention_heads=128,
    num_key_value_heads=128,
    v_head_dim=128,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    kv_lora_rank=512,
    q_lora_rank=1536,
)
#: Kept small so two TP workers fit a 24 GB machine.
SMALL_REST = dict(
    vocab_size=2048,
    intermediate_size=512,  # the first_k_dense_replace dense layer(s)
    moe_intermediate_size=128,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    num_nextn_predict_layers=0,  # no MTP layer: not needed for memory
    initializer_range=0.006,  # V3's own (keeps bf16 activations finite at h=7168)
)
SEED = 1234
RECIPE = 1  # bump when the checkpoint recipe changes

CONFIGS = {
    "plain": ("plain TP2", {}),
    "fc2": ("FlashComm2 k=1 (replicated)", {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1"}),
    "oshared": ("FlashComm2 k=1 + o_shared", {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1",
                                              "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1"}),
}
FEATURE_ENV = ("VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED",
               "VLLM_ASCEND_FLASHCOMM2_OSHARED_PREFETCH_STEP")
TP = 2
PREFETCH_STEP = 1  # the flag's default


# --------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------


def checkpoint_dir(args) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    from vllm_ascend_ext.tiny_models.factory import default_cache_root

    return default_cache_root() / f"real-dims-{ARCH}-L{args.layers}-r{RECIPE}"


def build_checkpoint(out: Path, layers: int) -> dict:
    """Seeded random bf16 checkpoint with V3's attention dims (reused if present)."""
    recipe = {"architecture": ARCH, "recipe": RECIPE, "seed": SEED, "layers": layers,
              **REAL_ATTENTION, **SMALL_REST}
    marker = out / "real_dims_model.json"
    if marker.exists() and json.loads(marker.read_text()).get("recipe") == recipe:
        return json.loads(marker.read_text())
    import torch
    import transformers

    from vllm_ascend_ext.tiny_models import factory

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    factory.write_tokenizer(out)  # 512-token BPE; the model's vocab is larger (padding ids)
    kwargs = dict(factory.SPECS[ARCH].config_kwargs)
    kwargs.update(REAL_ATTENTION)
    kwargs.update(SMALL_REST)
    kwargs["num_hidden_layers"] = layers
    config = transformers.DeepseekV3Config(**kwargs)
    config.architectures = [ARCH]
    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built and initialised in bf16 directly
    try:
        model = transformers.DeepseekV3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    del model
    factory.write_model_config(config, out, "bfloat16")
    info = {
        "recipe": recipe,
        "parameters": n_params,
        "safetensors_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "build_seconds": time.perf_counter() - t0,
    }
    marker.write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------
# worker-side probes (run inside vLLM's worker processes)
# --------------------------------------------------------------------------


def proc_status() -> dict:
    """VmRSS / VmHWM / RssAnon / RssFile / RssShmem of this process, in bytes."""
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0]) * 1024  # kB
    return out


def _trim_heap() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _make_load_probe_worker():
    from vllm.v1.worker.cpu_worker import CPUWorker

    class LoadProbeWorker(CPUWorker):
        """vLLM's CPU worker, recording this process's memory around load_model."""

        def load_model(self, *args, **kwargs):
            import threading

            before = proc_status()
            peak = dict(before)
            done = threading.Event()

            def sample():  # VmHWM has no anon/file split: sample the split
                while not done.wait(0.01):
                    for k, v in proc_status().items():
                        peak[k] = max(peak[k], v)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            try:
                super().load_model(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                done.set()
                sampler.join()
            self.bench_load = {"seconds": seconds, "before": before, "after": proc_status(),
                               "sampled_peak": peak}

    return LoadProbeWorker


def __getattr__(name):  # vLLM resolves worker_cls="bench_real_dims.LoadProbeWorker"
    if name == "LoadProbeWorker":
        cls = _make_load_probe_worker()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def _hidden_oproj_modules(model):
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.models.utils import extract_layer_index

    num_hidden = getattr(getattr(model, "config", None), "num_hidden_layers", 1 << 30)
    return [m for name, m in model.named_modules()
            if name.endswith("self_attn.o_proj") and isinstance(m, LinearBase)
            and extract_layer_index(name) < num_hidden]


def probe_worker(worker) -> dict:
    """Memory facts of one worker after start-up (non-destructive)."""
    import resource

    from vllm_ascend_ext.models.introspect import oproj_memory

    mods = _hidden_oproj_modules(worker.model_runner.get_model())
    return {
        "rank": worker.rank,
        "pid": os.getpid(),
        "load": getattr(worker, "bench_load", None),
        "steady": proc_status(),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "introspect": oproj_memory(worker),
        "o_proj_gemm": sorted({
            "F.linear" if getattr(m, "_cpu_skip_gemm_dispatch", False)
            else getattr(getattr(m, "cpu_linear", None), "__qualname__", "?")
            for m in mods}),
    }


def release_oproj(worker) -> dict:
    """Drop every hidden layer's o_proj state and measure the RSS that goes
    away (destructive: call last).  Covers tensors, vLLM CPU's oneDNN/sgl
    handles (held by ``layer.cpu_linear``) and the o_shared series' buffers."""
    import torch

    model = worker.model_runner.get_model()
    mods = _hidden_oproj_modules(model)
    _trim_heap()
    before = proc_status()
    for m in mods:
        for table in (m._parameters, m._buffers):
            for t in table.values():
                if isinstance(t, torch.Tensor):
                    t.data = torch.empty(0, dtype=t.dtype)
        m.__dict__.pop("cpu_linear", None)
    series = getattr(getattr(model, "flashcomm2", None), "series", None)
    if series is not None:  # owned layers + ring slots
        series.synchronize()  # a pending prefetch's gloo work holds its slot
        series.ring.resident.clear()
        series.ring.slots.clear()
    _trim_heap()
    after = proc_status()
    return {"rank": worker.rank, "layers": len(mods), "before": before, "after": after,
            "freed_anon_bytes": before["RssAnon"] - after["RssAnon"],
            "freed_rss_bytes": before["VmRSS"] - after["VmRSS"]}


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
                  worker_cls="bench_real_dims.LoadProbeWorker")
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

    from vllm_ascend_ext.local_server import cpu_env

    env = {k: v for k, v in os.environ.items() if k not in FEATURE_ENV}
    env.update(cpu_env(TP))
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    env.update(CONFIGS[key][1])
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
    from vllm_ascend_ext import planner

    shape = planner.load_model_shape(str(model))
    p = planner.plan(shape, planner.PlanInputs(tp=TP, otp_size=1, prefetch_step=PREFETCH_STEP,
                                               weight_dtype="bf16", tokens=tuple(tokens)))
    st = p["memory"]["stages"][0]
    return {
        "function": "vllm_ascend_ext.planner.plan -> memory.stages[0]",
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
# timing world
# --------------------------------------------------------------------------


def _timing_worker(rank, world_size, args):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import get_tp_group
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    torch.set_num_threads(1)
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

    with set_current_vllm_config(VllmConfig()):
        group = get_tp_group()
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
    from dist_utils import run_distributed

    t0 = time.perf_counter()
    per_rank = run_distributed(_timing_worker, TP, args, timeout=args.timeout,
                               env={"OMP_NUM_THREADS": "1"})
    return {"seconds": time.perf_counter() - t0, "repeats": args.repeats,
            "tokens": list(args.tokens), "layers": args.timing_layers,
            "weight": [REAL_ATTENTION["hidden_size"],
                       REAL_ATTENTION["num_attention_heads"] * REAL_ATTENTION["v_head_dim"]],
            "dtype": "bfloat16", "threads_per_rank": 1, "per_rank": per_rank}


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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    text = table(res)
    out.with_suffix(".txt").write_text(text)
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

    from vllm_ascend_ext.cpu_attention import cpu_has_amx, cpu_model_name

    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() and args.phase != "all" else {}
    import vllm

    res.update({
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {cpu_model_name()}"
                   f"{' (AMX)' if cpu_has_amx() else ' (no AMX)'}",
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
