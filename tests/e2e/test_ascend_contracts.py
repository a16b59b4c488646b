"""vllm-ascend's patterns around our layers, reproduced on vLLM CPU with
vLLM's own classes (docs/ascend.md, "Integration contracts").

Contract 1, private references to o_proj: vllm-ascend's MLA impl keeps its
own reference to o_proj and runs it. ``ascend_emulation/`` is a test-only vLLM
plugin that gives vLLM CPU's MLA exactly that shape, loaded through vLLM's
plugin entry point in every process. Before the fix, the swap left every
impl on the old, never-loaded o_proj (5 layers x 2 ranks), and
FlashComm2 + o_shared ran garbage on Ascend without an error.
"""

from __future__ import annotations

from tests.e2e.harness import (
    ASCEND_MLA_PLUGIN,
    MEMORY_RPC,
    assert_greedy_close,
    assert_prompt_logprobs_close,
    flashcomm2_flags,
    with_plugin,
)

ARCH = "DeepseekV3ForCausalLM"


def _ascend_mla_env(**flags: str) -> dict[str, str]:
    return with_plugin(flags, ASCEND_MLA_PLUGIN)


def test_mla_impl_private_o_proj_follows_the_swap(engines):
    plain = engines.run(ARCH, tp=2)
    ref = engines.run(ARCH, tp=2, env=_ascend_mla_env())
    got = engines.run(ARCH, tp=2, env=_ascend_mla_env(**flashcomm2_flags(1, True, 1)))
    for run, want in ((ref, "RowParallelLinear"), (got, "FlashComm2RowParallelLinear")):
        for worker in run.rpc[MEMORY_RPC]:
            # the emulation is active: every MLA layer's impl holds an o_proj ...
            assert worker["impl_o_proj_count"] == 5, worker
            # ... and it is the model's live one, of the expected class
            assert worker["impl_o_proj_stale"] == 0, worker
            assert worker["impl_o_proj_classes"] == [want], worker
    # The arrangement itself changes no arithmetic.
    assert_prompt_logprobs_close(plain.outputs, ref.outputs, atol=0.0,
                                 names=("vLLM CPU MLA", "vllm-ascend-shaped MLA"))
    # The swap's replaced modules were freed (install_flashcomm2 checks every
    # one with a weakref and refuses to start otherwise), and the projection
    # the impl runs is the loaded FlashComm2 one.
    worst = assert_prompt_logprobs_close(ref.outputs, got.outputs,
                                         names=("plain TP", "FC2 + o_shared, impl-held o_proj"))
    assert_greedy_close(ref.outputs, got.outputs, names=("plain TP", "FC2 + o_shared"))
    print(f"\nvllm-ascend-shaped MLA, FC2 + o_shared vs plain TP2: gap {worst:.2e}")
