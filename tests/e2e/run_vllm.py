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


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ.update({k: str(v) for k, v in spec.get("env", {}).items()})
    if spec.get("pretend_amx"):
        import torch

        # vLLM's CPU platform asks this very function which MLA backend to take.
        torch.cpu._is_amx_tile_supported = lambda: True

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
    from vllm_ascend_ext.cpu_attention import cpu_attention_backend

    # Stated, never picked by vLLM from the CPU model (AMX_MLA takes no fp32).
    backend = cpu_attention_backend(spec["model"], llm_kwargs["dtype"])
    if backend:
        llm_kwargs["attention_backend"] = backend
    llm_kwargs.update(spec.get("llm_kwargs", {}))
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
    result = {"outputs": []}
    for out in outputs:
        comp = out.outputs[0]
        result["outputs"].append({
            "prompt_token_ids": list(out.prompt_token_ids),
            # Position 0 has no logprob; keep None there.
            "prompt_logprobs": [None if e is None else _top(e) for e in out.prompt_logprobs],
            "token_ids": list(comp.token_ids),
            "logprobs": [_top(e) for e in comp.logprobs],
        })
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
