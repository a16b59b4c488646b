"""o_proj memory per rank, read from inside real vLLM workers (TP=2, o_shared)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.harness import MEMORY_RPC, flashcomm2_flags


def _layer_bytes(model_dir) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    if "kv_lora_rank" in cfg:
        a = cfg["num_attention_heads"] * cfg["v_head_dim"]
    else:
        a = cfg["num_attention_heads"] * cfg["head_dim"]
    return a * cfg["hidden_size"] * 4  # fp32, full o_proj (k=1)


# The accuracy tests' o_shared engines (test_flashcomm2_accuracy.OSHARED_STEP).
@pytest.mark.parametrize("arch,step", [("DeepseekV3ForCausalLM", 2), ("Qwen3ForCausalLM", 1)])
def test_oshared_holds_plain_tp_shards_plus_the_ring(arch, step, engines, tiny_model):
    """TP-shard storage (auto at TP=2, one replica): every rank holds exactly
    plain TP's o_proj (L x W/2) plus one full o_proj per ring slot, read from
    the tensors the workers hold (every byte is a real storage: the shards
    stay plain tensors, so nothing hides in a oneDNN handle)."""
    model_dir = tiny_model(arch)
    L = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    W = _layer_bytes(model_dir)
    shared = engines.run(arch, tp=2, env=flashcomm2_flags(1, True, step)).rpc[MEMORY_RPC]
    for rank in range(2):
        got = shared[rank]
        assert got["oshared_storage"] == "tp_shard", got
        assert got["o_proj_layers"] == L
        report = got["series_report"]
        assert report["shard_bytes"] == L * W // 2, report
        assert report["slots"] == step and report["slot_bytes"] == step * W, report
        # A FlashComm2 step gathers W per layer over the 2 ranks: W/2 in, W/2 out.
        assert report["gathered_bytes_per_layer"] == W and report["group_size"] == 2
        # What the workers' tensors hold, counted once per storage.
        assert got["o_proj_total_bytes"] == L * W // 2 + step * W, got
        print(f"{arch} rank {rank}: plain TP {L * W // 2} B + {step} slot(s) {step * W} B "
              f"= {got['o_proj_total_bytes']} B (FlashComm2 alone: {L * W} B)")


def test_default_flags_hold_plain_tp_plus_one_slot(engines, tiny_model):
    """The flags a user sets (adaptive switch on) hold what the switch off
    holds: plain TP's shards, which the small steps run, plus the ring, which
    the large ones fill; the planner gives the same figure. (The accuracy
    tests' engines: the switch at 8 tokens and off.)"""
    from vllm_ascend_ext.tools.planner.model import PlanInputs, plan
    from vllm_ascend_ext.tools.planner.shapes import load_model_shape

    arch = "Qwen3ForCausalLM"
    model_dir = tiny_model(arch)
    L = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    W = _layer_bytes(model_dir)
    off = engines.run(arch, tp=2, env=flashcomm2_flags(1, True, 1)).rpc[MEMORY_RPC]
    on = engines.run(arch, tp=2, env=flashcomm2_flags(1, True, 1, adaptive=8)).rpc[MEMORY_RPC]
    planned = plan(load_model_shape(str(model_dir)),
                   PlanInputs(tp=2, weight_dtype="fp32", act_dtype="fp32",
                              adaptive_tokens=8))["memory"]
    assert planned["storage"] == "tp_shard"
    for rank in range(2):
        assert on[rank]["oshared_storage"] == off[rank]["oshared_storage"] == "tp_shard"
        assert on[rank]["o_proj_total_bytes"] == off[rank]["o_proj_total_bytes"] \
            == L * W // 2 + W == planned["ours_total_bytes"], (on[rank], off[rank])
        assert on[rank]["series_report"] == off[rank]["series_report"]
        assert on[rank]["o_proj_resident_slice_bytes"] == L * W // 2 \
            == planned["resident_slice_bytes"]
