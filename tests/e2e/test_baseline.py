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
    run_vllm,
)
from vllm_ascend_ext.tiny_models import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vllm_matches_transformers_at_tp1_and_tp2(arch, tiny_model):
    model = tiny_model(arch)
    prompts = make_prompts(model)
    ref = hf_reference(model, prompts)
    for tp in (1, 2):
        got = run_vllm(model, prompts, tp=tp).outputs
        worst = assert_prompt_logprobs_close(ref, got, names=("transformers", f"vLLM TP={tp}"))
        assert_greedy_close(ref, got, names=("transformers", f"vLLM TP={tp}"))
        print(f"{arch} TP={tp}: max |prompt logprob diff| = {worst:.2e}")
