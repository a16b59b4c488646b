"""The baseline every FlashComm2 accuracy claim rests on: vLLM CPU (with our
patch set) reproduces transformers on the tiny checkpoints, for all five
architectures, at TP=1 and TP=2, in fp32."""

from __future__ import annotations

import pytest

from tests.e2e.harness import (
    arch_params,
    assert_greedy_close,
    assert_prompt_logprobs_close,
    hf_reference,
    make_prompts,
    skip_without_cpu_mla,
)
from vllm_ascend_ext.tools.tiny_models import ARCHITECTURES


@pytest.fixture(scope="session")
def hf_outputs(tiny_model):
    """transformers' fp32 answers per architecture, computed once."""
    cache: dict = {}

    def get(arch: str) -> list[dict]:
        if arch not in cache:
            model = tiny_model(arch)
            cache[arch] = hf_reference(model, make_prompts(model))
        return cache[arch]

    return get


# The range leg (vLLM 0.27.1) runs the Qwen family at TP2. The TP1 engines
# are single-rank: CI runs them in its unit lane.
@pytest.mark.parametrize("arch,tp", [
    pytest.param(*p.values, marks=(*p.marks, pytest.mark.single_rank)) if p.values[1] == 1 else p
    for p in arch_params(ARCHITECTURES, (1, 2), range_variants=(2,))])
def test_vllm_matches_transformers(arch, tp, hf_outputs, engines):
    skip_without_cpu_mla(arch)
    ref = hf_outputs(arch)
    # Shared with the FlashComm2 tests, which use TP=2 as their reference.
    got = engines.run(arch, tp=tp).outputs
    worst = assert_prompt_logprobs_close(ref, got, names=("transformers", f"vLLM TP={tp}"))
    assert_greedy_close(ref, got, names=("transformers", f"vLLM TP={tp}"))
    print(f"{arch} TP={tp}: max |prompt logprob diff| = {worst:.2e}")


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "Qwen3ForCausalLM"])
def test_vllm_matches_transformers_at_pp2(arch, hf_outputs, engines):
    """Pipeline parallel on vLLM CPU needs patch 0002 (without it the second
    stage fails ``assert self.intermediate_tensors is not None``). PP2 x TP2
    flags off: the engine the PP o_shared case compares with."""
    skip_without_cpu_mla(arch)
    ref = hf_outputs(arch)
    got = engines.run(arch, tp=2, pp=2).outputs
    worst = assert_prompt_logprobs_close(ref, got, names=("transformers", "vLLM PP=2 x TP=2"))
    assert_greedy_close(ref, got, names=("transformers", "vLLM PP=2 x TP=2"))
    print(f"{arch} PP=2 x TP=2: max |prompt logprob diff| = {worst:.2e}")
