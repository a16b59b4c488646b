"""Run one vLLM offline engine configuration and dump logprobs as JSON.

``run_engine`` is what an engine driver (``engine_driver.py``) calls for each
spec it is sent; run as a script, this file runs one spec in a process of its
own (``harness.run_vllm(..., fresh_process=True)``):

    python run_vllm.py SPEC.json OUT.json
"""

from __future__ import annotations

import json
import sys


def _top(logprobs_entry) -> dict[str, float]:
    return {str(tok): float(lp.logprob) for tok, lp in logprobs_entry.items()}


def _spec_decode_counters(llm) -> dict:
    """vLLM's own speculative-decoding counters (``vllm:spec_decode_*``):
    drafts, draft tokens, accepted tokens, and accepted tokens per position."""
    counters: dict = {}
    for metric in llm.get_metrics():
        if not metric.name.startswith("vllm:spec_decode_"):
            continue
        name = metric.name.removeprefix("vllm:spec_decode_")
        if hasattr(metric, "values"):  # the per-position vector
            counters[name] = [int(v) for v in metric.values]
        else:
            counters[name] = int(metric.value)
    return counters


def run_engine(spec: dict) -> dict:
    """Build the engine ``spec`` describes, generate, run its RPCs, shut it
    down (its workers exit before this returns) and return the results."""
    from vllm import LLM, SamplingParams

    llm_kwargs = dict(
        model=spec["model"],
        tensor_parallel_size=spec.get("tp", 1),
        pipeline_parallel_size=spec.get("pp", 1),
        dtype=spec.get("dtype", "float32"),
        enforce_eager=spec.get("enforce_eager", True),
        max_model_len=spec.get("max_model_len", 256),
        max_num_seqs=spec.get("max_num_seqs", 8),
        # Every prompt set here fits one step (and the adaptive cases need
        # their prefill in one); vLLM's default sizes the start-up profile
        # and warm-up passes at thousands of tokens, seconds on 2 cores.
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 256),
        # 8 sequences of at most 256 tokens need a few MiB of KV cache; the
        # harness's CPU env (VLLM_CPU_KVCACHE_SPACE, whole GiB) would have each
        # worker allocate and fault in 1 GiB.
        kv_cache_memory_bytes=spec.get("kv_cache_memory_bytes", 64 << 20),
        seed=0,
        # Workers of their own even at TP=1: the model, the plugin's
        # per-process state and vLLM's distributed state then live and die
        # with this engine's workers, never in a driver that runs the next.
        distributed_executor_backend="mp",
    )
    from vllm_ascend_ext.cpu_attention import cpu_attention_backend, draft_speculative_config

    # Stated, never picked by vLLM from the CPU model (AMX_MLA takes no fp32),
    # for the target model and for a speculative draft alike.
    backend = cpu_attention_backend(spec["model"], llm_kwargs["dtype"])
    if backend:
        llm_kwargs["attention_backend"] = backend
    llm_kwargs.update(spec.get("llm_kwargs", {}))
    if "speculative_config" in llm_kwargs and not spec.get("draft_backend_unstated"):
        llm_kwargs["speculative_config"] = draft_speculative_config(
            llm_kwargs["speculative_config"], backend)
    if spec.get("spec_decode_metrics"):
        llm_kwargs["disable_log_stats"] = False  # the engine's metrics feed get_metrics()
    llm = LLM(**llm_kwargs)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=spec.get("max_tokens", 8),
        logprobs=spec.get("num_logprobs", 5),
        prompt_logprobs=spec.get("num_logprobs", 5),
        ignore_eos=True,
    )
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    for rpc in spec.get("rpc_before_generate", []):  # e.g. start counting per side
        llm.collective_rpc(_rpc_target(rpc))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    import vllm_ascend_ext

    # Which checkout the engine really ran (the harness compares it with its own).
    result = {"outputs": [], "plugin_file": vllm_ascend_ext.__file__}
    for out in outputs:
        comp = out.outputs[0]
        result["outputs"].append({
            "prompt_token_ids": list(out.prompt_token_ids),
            # Position 0 has no logprob; keep None there.
            "prompt_logprobs": [None if e is None else _top(e) for e in out.prompt_logprobs],
            "token_ids": list(comp.token_ids),
            "logprobs": [_top(e) for e in comp.logprobs],
        })
    if spec.get("spec_decode_metrics"):
        result["spec_decode"] = _spec_decode_counters(llm)
    for rpc in spec.get("collective_rpc", []):
        result.setdefault("rpc", {})[rpc] = llm.collective_rpc(_rpc_target(rpc))
    llm.llm_engine.engine_core.shutdown()
    del llm
    return result


def _rpc_target(rpc: str):
    """"package.module:function" runs that function on every worker; a bare
    name is a worker method."""
    if ":" not in rpc:
        return rpc
    import importlib

    mod, fn = rpc.split(":")
    return getattr(importlib.import_module(mod), fn)


def main(spec_path: str, out_path: str) -> None:
    result = run_engine(json.loads(open(spec_path).read()))
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
