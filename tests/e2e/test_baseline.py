"""The baseline every FlashComm2 accuracy claim rests on: vLLM CPU (with our
patch set) reproduces transformers on the tiny checkpoints, for all five
architectures, at TP=1 and TP=2, in fp32."""

from __future__ import annotations

import pytest

from tests.e2e.harness import (
    assert_greedy_close,
    assert_prompt_logprobs_close,
    hf_reference,
    make_prompts,
)
from vllm_ascend_ext.tiny_models import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vllm_matches_transformers_at_tp1_and_tp2(arch, tiny_model, engines):
    model = tiny_model(arch)
    ref = hf_reference(model, make_prompts(model))
    for tp in (1, 2):
        # Shared with the FlashComm2 tests, which use TP=2 as their reference.
        got = engines.run(arch, tp=tp).outputs
        worst = assert_prompt_logprobs_close(ref, got, names=("transformers", f"vLLM TP={tp}"))
        assert_greedy_close(ref, got, names=("transformers", f"vLLM TP={tp}"))
        print(f"{arch} TP={tp}: max |prompt logprob diff| = {worst:.2e}")


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "Qwen3ForCausalLM"])
def test_vllm_matches_transformers_at_pp2(arch, tiny_model, engines):
    """Pipeline parallel on vLLM CPU needs patch 0002 (without it the second
    stage fails ``assert self.intermediate_tensors is not None``)."""
    model = tiny_model(arch)
    ref = hf_reference(model, make_prompts(model))
    got = engines.run(arch, tp=1, pp=2).outputs
    worst = assert_prompt_logprobs_close(ref, got, names=("transformers", "vLLM PP=2"))
    assert_greedy_close(ref, got, names=("transformers", "vLLM PP=2"))
    print(f"{arch} PP=2: max |prompt logprob diff| = {worst:.2e}")
