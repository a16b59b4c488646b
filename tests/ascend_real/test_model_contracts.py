"""Contracts 1, 5 and 6 (docs/ascend.md) against vllm-ascend main's own
classes: vLLM's DeepSeek-V3 and Qwen3 built under vllm-ascend's
``NPUPlatform`` with its worker patches (2 gloo ranks, TP2), our FlashComm2
install on them, and the real ``AscendMLAImpl.forward`` calling our o_proj.
"""

from __future__ import annotations

from tests.ascend_real.worlds import result

ASCEND = "vllm_ascend"
FC2 = "vllm_ascend_ext.ops.flashcomm2_oproj.FlashComm2RowParallelLinear"
ASCEND_ROW = f"{ASCEND}.ops.linear.AscendRowParallelLinear"
ASCEND_UNQUANTIZED = f"{ASCEND}.ops.linear.AscendUnquantizedLinearMethod"
ASCEND_MLA_IMPL = f"{ASCEND}.attention.mla_v1.AscendMLAImpl"
NUM_HIDDEN = 5  # the tiny models' hidden layers


def _without_o_proj(children: dict) -> dict:
    return {n: c for n, c in children.items() if n != "o_proj"}


def test_deepseek_as_vllm_ascend_builds_it_gets_our_o_proj_and_the_impl_follows(two_rank_world):
    for r in result(two_rank_world, "build deepseek"):
        assert len(r["ours"]) == len(r["plain"]) == NUM_HIDDEN
        for ours, plain in zip(r["ours"], r["plain"]):
            # vllm-ascend's build: vLLM's attention class (its __init__ patched by
            # patch_deepseek_v2), vllm-ascend's MLA wrapper, vLLM's MLAAttention,
            # vllm-ascend's impl holding the very o_proj module
            assert plain["attn"] == "vllm.model_executor.models.deepseek_v2.DeepseekV2MLAAttention"
            assert plain["children"]["mla_attn"] == f"{ASCEND}.ops.mla.AscendMultiHeadLatentAttention"
            assert plain["mla_inner"].endswith(".MLAAttention")
            assert plain["o_proj"] == ASCEND_ROW
            assert plain["impls"] == [("mla_attn.mla_attn", ASCEND_MLA_IMPL, True, True)]
            # ours: only the o_proj differs; it runs vllm-ascend's unquantized
            # method, and the impl's private reference followed the swap
            assert _without_o_proj(ours["children"]) == _without_o_proj(plain["children"])
            assert ours["o_proj"] == FC2
            assert ours["o_proj_method"] == plain["o_proj_method"] == ASCEND_UNQUANTIZED
            assert ours["impls"] == [("mla_attn.mla_attn", ASCEND_MLA_IMPL, True, True)]
        assert r["series"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(NUM_HIDDEN)]


def test_qwen3_as_vllm_ascend_builds_it_gets_our_o_proj(two_rank_world):
    for r in result(two_rank_world, "build qwen"):
        for ours, plain in zip(r["ours"], r["plain"]):
            assert plain["o_proj"] == ASCEND_ROW
            assert plain["children"]["qkv_proj"] == f"{ASCEND}.ops.linear.AscendQKVParallelLinear"
            # vllm-ascend's attention impl keeps no o_proj: vLLM's Qwen3Attention calls it
            impl = (f"{ASCEND}.attention.attention_v1.AscendAttentionBackendImpl", False, False)
            assert [i[1:] for i in plain["impls"]] == [impl]
            assert _without_o_proj(ours["children"]) == _without_o_proj(plain["children"])
            assert ours["o_proj"] == FC2
            assert ours["o_proj_method"] == ASCEND_UNQUANTIZED
            assert [i[1:] for i in ours["impls"]] == [impl]


def test_a_holder_hidden_in_the_real_impl_stops_start_up_naming_it(two_rank_world):
    """(a) an attribute of the real AscendMLAImpl we do not rewire; (b) the swap
    as it was before the fix (nn.Module children only) leaves the impl's own
    ``o_proj``: the check names vllm-ascend's class and attribute."""
    from tests.ascend_real.model_checks import stale_message_names

    for r in result(two_rank_world, "stale holders"):
        for case, attribute in (("hidden attribute", "kept_for_later"),
                                ("children only", "o_proj")):
            names = stale_message_names(r[case])
            assert names == [f"{ASCEND_MLA_IMPL}.{attribute}"] * NUM_HIDDEN, (case, r[case])


def test_real_mla_impl_forward_runs_our_o_proj_with_is_prefill(two_rank_world):
    """vLLM's DeepseekV2MLAAttention -> AscendMultiHeadLatentAttention ->
    vllm::mla_forward -> AscendMLAImpl.forward, with only its attention kernels
    replaced: our FlashComm2 + o_shared o_proj equals vllm-ascend's
    AscendRowParallelLinear through that call, and gets ``is_prefill``."""
    from tests.ascend_real.model_checks import BATCHES

    expected = []
    for _, num_decodes, prefills in BATCHES:
        expected += [bool(prefills)] * NUM_HIDDEN
    for r in result(two_rank_world, "mla forward"):
        assert r["o_proj_classes"] == {"ours": [FC2], "slice": [FC2], "plain": [ASCEND_ROW]}
        assert r["is_prefill"] == {"ours": expected, "slice": expected, "plain": expected}
        for batch, b in r["batches"].items():
            assert b["gap"] <= 1e-5 * b["scale"], (batch, b)
            assert b["vs_math"] <= 1e-4 * b["scale"], (batch, b)
        # TP-shard storage (auto: one replica) over AscendUnquantizedLinearMethod's
        # own declaration; threshold 0: the ring ran, one wait and one
        # all-gather per layer and batch (plus the initial fill of slot 0)
        assert r["series"]["ours"]["storage"] == "tp_shard"
        assert r["series"]["ours"]["layers"] == NUM_HIDDEN
        assert r["series"]["ours"]["waits"] == NUM_HIDDEN * len(BATCHES)
        assert r["series"]["ours"]["transfers"] == NUM_HIDDEN * len(BATCHES) + 1
        # default threshold: these small batches ran the resident slice,
        # vllm-ascend's own row-parallel layer, and never touched the ring
        assert r["slice_classes"] == [ASCEND_ROW]
        assert r["series"]["slice"]["waits"] == 0
        assert r["series"]["slice"]["transfers"] == 1  # the initial fill only
        assert r["series"]["slice"]["row_parallel_calls"] == NUM_HIDDEN * len(BATCHES)


def test_oshared_under_vllm_ascends_graph_mode_captures_only_small_steps(tmp_path):
    """Contract 5: vllm-ascend's platform turns graph capture on by default.
    o_shared accepts it while every captured batch size is at or below the
    adaptive threshold (those steps run plain TP from the shard, with no ring
    operation), and refuses it, naming the sizes, where one is above."""
    import pytest

    from tests.ascend_real.configs import FLAGS, engine_config, tiny_config_dir
    from tests.ascend_real.model_checks import fresh
    from vllm_ascend_ext.config import (
        DEFAULT_ADAPTIVE_TOKENS,
        FlashComm2ConfigError,
        get_flashcomm2_config,
        graph_capture_sizes,
    )

    cfg = engine_config(tiny_config_dir("Qwen3ForCausalLM", tmp_path), 2,
                        additional_config=FLAGS, enforce_eager=False)
    mode = cfg.compilation_config.cudagraph_mode.name
    sizes = graph_capture_sizes(cfg)
    assert mode != "NONE" and sizes, (mode, sizes)
    assert max(sizes) <= DEFAULT_ADAPTIVE_TOKENS, sizes  # vllm-ascend's decode graphs
    assert get_flashcomm2_config(cfg).oshared
    low = fresh(cfg)
    low.additional_config = {**FLAGS, "flashcomm2_adaptive_tokens": max(sizes) - 1}
    with pytest.raises(FlashComm2ConfigError,
                       match=rf"cudagraph_mode={mode}\b.*capture sizes \[{max(sizes)}\] exceed "
                             r".*--enforce-eager"):
        get_flashcomm2_config(low)
    fc2_only = fresh(cfg)
    fc2_only.additional_config = {"enable_flashcomm2_parallel_size": 1,
                                  "flashcomm2_adaptive_tokens": 0}
    assert get_flashcomm2_config(fc2_only).parallel_size == 1
