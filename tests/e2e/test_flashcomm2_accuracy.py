"""FlashComm2 (+ o_shared) inside real vLLM engines gives plain TP's answers.

Every case runs a real engine on a saved tiny checkpoint (fp32) with the env
flags set exactly as a user sets them, and is compared with the plain-TP run
of the same checkpoint and layout using the harness's criteria (prompt
logprobs within ``PROMPT_LOGPROB_ATOL``; greedy continuations under the
``check_logprobs_close`` rule).  Each run also reports, from inside its
workers, which class serves o_proj, so a case cannot pass by silently running
vLLM's own RowParallelLinear.
"""

from __future__ import annotations

import pytest

from tests.e2e.harness import (
    MEMORY_RPC,
    arch_params,
    assert_greedy_close,
    assert_prompt_logprobs_close,
)
from tests.e2e.harness import flashcomm2_flags as flags
from vllm_ascend_ext.tools.tiny_models import ARCHITECTURES


def _o_proj_classes(result) -> set[str]:
    return {c for worker in result.rpc[MEMORY_RPC] for c in worker["o_proj_classes"]}


def _check(ref, got, label):
    assert "FlashComm2RowParallelLinear" in _o_proj_classes(got), (
        f"{label}: the FlashComm2 op is not serving o_proj: {_o_proj_classes(got)}")
    worst = assert_prompt_logprobs_close(ref.outputs, got.outputs, names=("plain TP", label))
    assert_greedy_close(ref.outputs, got.outputs, names=("plain TP", label))
    print(f"{label}: max |prompt logprob diff| vs plain TP = {worst:.2e}")


# One engine per cell of the models x layouts table: FlashComm2 alone, and
# with o_shared at one prefetch step per architecture (both steps across the
# table; tests/test_shared_weight.py sweeps step, start layer and rank count
# on gloo worlds). DeepSeek-V3 at step 2 and Qwen3 at step 1 are also the
# memory test's engines.
OSHARED_STEP = {
    "DeepseekV2ForCausalLM": 1,
    "DeepseekV3ForCausalLM": 2,
    "Qwen2ForCausalLM": 2,
    "Qwen3ForCausalLM": 1,
    "Qwen3MoeForCausalLM": 2,
}


def _tp2_variant(arch: str, variant: str) -> dict[str, str]:
    return flags(1) if variant == "FC2 k=1" else flags(1, True, OSHARED_STEP[arch])


# The range leg (vLLM 0.27.1) runs FlashComm2 with and without o_shared.
@pytest.mark.parametrize("arch,variant", arch_params(
    ARCHITECTURES, ("FC2 k=1", "FC2 k=1 o_shared"), range_variants=("FC2 k=1", "FC2 k=1 o_shared")))
def test_tp2_flashcomm2_and_oshared_match_plain_tp(arch, variant, engines):
    ref = engines.run(arch, tp=2)
    assert _o_proj_classes(ref) == {"RowParallelLinear"}
    label = variant + (f" step {OSHARED_STEP[arch]}" if "o_shared" in variant else "")
    _check(ref, engines.run(arch, tp=2, env=_tp2_variant(arch, variant)), f"{arch} TP2 {label}")


# TP=4 puts four ranks on the CI machine's two cores, where vLLM CPU's
# spin-waiting shared-memory all-reduce can stall a run for minutes; so TP=4
# covers one MLA and one GQA model with o_shared and one MoE model without,
# against the plain TP=2 run (TP changes only reduction order).  The op-level
# tests sweep k=2 on every token count, dtype and o_shared setting.
@pytest.mark.parametrize("arch,oshared", [
    ("DeepseekV3ForCausalLM", True),
    ("Qwen3ForCausalLM", True),
    ("Qwen3MoeForCausalLM", False),
])
def test_tp4_otp2_matches_plain_tp(arch, oshared, engines):
    """o_proj TP size 2 inside TP=4: all-to-all over ODP pairs, reduce-scatter
    over OTP pairs, o_shared over each ODP pair."""
    ref = engines.run(arch, tp=2)
    label = f"{arch} TP4 FC2 k=2" + (" o_shared" if oshared else "")
    _check(ref, engines.run(arch, tp=4, env=flags(2, oshared)), label)


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "Qwen3ForCausalLM"])
def test_pp2_oshared_matches_plain_tp(arch, engines):
    """PP=2 x TP=2: the second stage's series starts at layer 3 of 5, where
    upstream's prefetch index was wrong.  Compared with the same layout with
    the flags off, and, since pipeline parallelism changes no arithmetic, with
    plain TP=2 without PP (both need patch 0002)."""
    same_layout = engines.run(arch, tp=2, pp=2)
    assert _o_proj_classes(same_layout) == {"RowParallelLinear"}
    got = engines.run(arch, tp=2, pp=2, env=flags(1, True, 1))
    _check(same_layout, got, f"{arch} PP2 x TP2 FC2 k=1 o_shared (vs PP2 x TP2 flags off)")
    _check(engines.run(arch, tp=2), got, f"{arch} PP2 x TP2 FC2 k=1 o_shared (vs TP2)")
    reports = [w["series_report"] for w in got.rpc[MEMORY_RPC]]
    # Two stages of two ranks; stage sizes follow vLLM's split of 5 layers.
    assert sorted(r["num_layers"] for r in reports) == [2, 2, 3, 3]


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "Qwen3ForCausalLM"])
def test_compiled_oshared_matches_plain_tp(arch, engines):
    """torch.compile (vLLM's DYNAMO_TRACE_ONCE + inductor on CPU) with the
    shared-weight custom ops in the graph, against eager plain TP: compiling
    changes no arithmetic beyond reduction order, which the tolerance covers."""
    ref = engines.run(arch, tp=2)
    _check(ref, engines.run(arch, tp=2, env=flags(1, True, 1), eager=False),
           f"{arch} TP2 compiled FC2 o_shared")


# Adaptive FlashComm2: the 3 prompts' prefill (about 40 tokens in one step)
# runs FlashComm2, every decode step (3 tokens) the plain row-parallel side.
ADAPTIVE_TOKENS = 8


def _assert_both_sides_ran(got):
    for worker in got.rpc[MEMORY_RPC]:
        side = worker["adaptive"]
        assert side["flashcomm2_calls"] > 0 and side["row_parallel_calls"] > 0, side
        # every layer's small side is plain TP's own o_proj
        assert side["layers_with_resident_slice"] == worker["o_proj_layers"], worker


@pytest.mark.parametrize("arch,oshared,eager", [
    ("DeepseekV3ForCausalLM", True, True),
    ("Qwen3ForCausalLM", True, True),
    ("Qwen3ForCausalLM", False, True),
    ("Qwen3ForCausalLM", True, False),  # compiled: the op-level test sweeps the rest
])
def test_adaptive_flashcomm2_matches_plain_tp(arch, oshared, eager, engines):
    """Prefill above the threshold, decode below it: both sides in one run,
    eager and compiled (the switch is one custom op: no guard, no recompile),
    against eager plain TP."""
    ref = engines.run(arch, tp=2)
    got = engines.run(arch, tp=2, eager=eager,
                      env=flags(1, oshared, 1 if oshared else None, adaptive=ADAPTIVE_TOKENS))
    mode = "eager" if eager else "compiled"
    _check(ref, got, f"{arch} TP2 adaptive FC2 (<= {ADAPTIVE_TOKENS} tokens: row-parallel)"
           f"{' o_shared' if oshared else ''} {mode}")
    # With and without o_shared: plain TP's own o_proj kept resident (no ring
    # read on small passes, no strided view of FlashComm2's weight).
    _assert_both_sides_ran(got)
