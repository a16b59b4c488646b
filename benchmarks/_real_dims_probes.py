"""Probes that ``bench_real_dims.py`` runs inside vLLM's worker processes:
``LoadProbeWorker`` (vLLM's CPU worker recording this process's memory around
``load_model``; ``worker_cls="_real_dims_probes.LoadProbeWorker"``), and the
``collective_rpc`` functions ``probe_worker`` (non-destructive) and
``release_oproj`` (drops the o_proj state and measures the RSS it frees; last).
"""

from __future__ import annotations

import os
import time

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



def __getattr__(name):  # vLLM resolves worker_cls="_real_dims_probes.LoadProbeWorker"
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

