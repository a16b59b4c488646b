"""Run one vLLM offline engine configuration and dump logprobs as JSON.

Each configuration runs in its own process (spawned by ``harness.run_vllm``),
so plugin state, env flags and worker processes never leak between cases.

    python run_vllm.py SPEC.json OUT.json
"""

from __future__ import annotations

import json
import os
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


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ.update({k: str(v) for k, v in spec.get("env", {}).items()})
    from vllm import LLM, SamplingParams

    llm_kwargs = dict(
        model=spec["model"],
        tensor_parallel_size=spec.get("tp", 1),
        pipeline_parallel_size=spec.get("pp", 1),
        dtype=spec.get("dtype", "float32"),
        enforce_eager=spec.get("enforce_eager", True),
        max_model_len=spec.get("max_model_len", 256),
        max_num_seqs=spec.get("max_num_seqs", 8),
        seed=0,
        distributed_executor_backend="mp" if spec.get("tp", 1) * spec.get("pp", 1) > 1 else None,
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
        # "package.module:function" runs that function on every worker.
        target = rpc
        if ":" in rpc:
            import importlib

            mod, fn = rpc.split(":")
            target = getattr(importlib.import_module(mod), fn)
        result.setdefault("rpc", {})[rpc] = llm.collective_rpc(target)
    with open(out_path, "w") as fh:
        json.dump(result, fh)
    del llm


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
