"""o_proj memory per rank, read from inside real vLLM workers (TP=2, o_shared)."""

from __future__ import annotations

import json
import math

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
def test_oshared_resident_bytes_are_owned_plus_ring(arch, step, engines, tiny_model):
    model_dir = tiny_model(arch)
    L = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    W = _layer_bytes(model_dir)
    n = 2  # o_shared group = the TP group at TP=2, k=1

    # Plain TP and FlashComm2-without-o_shared weights are not measurable
    # this way on vLLM CPU: its unquantized post-load packs them into oneDNN
    # handles and leaves the parameters empty.  o_shared keeps plain tensors
    # (see ops/shared_weight/members.py), so every byte it holds is a real storage.
    shared = engines.run(arch, tp=2, env=flashcomm2_flags(1, True, step)).rpc[MEMORY_RPC]

    for rank in range(n):
        # o_shared: owned layers (index % n == rank) + the ring slots this rank
        # receives into (slot = position % step; only non-owned positions).
        owned = sum(1 for i in range(L) if i % n == rank)
        slots = len({p % step for p in range(L) if p % n != rank})
        got = shared[rank]
        assert got["o_proj_layers"] == L
        assert got["o_proj_storage_bytes"] >= (owned + slots) * W
        report = got["series_report"]
        assert report is not None
        # The real storages agree with the series' own report (packing may
        # align each tensor, so allow the alignment padding only).
        assert got["o_proj_storage_bytes"] == report["resident_bytes"]
        assert report["resident_bytes"] - (owned + slots) * W < 64 * (owned + slots)
        assert report["replicated_bytes"] == L * W
        assert math.isclose(report["floor_bytes"], L * W / n, rel_tol=0, abs_tol=W)
        print(f"{arch} rank {rank}: replicated {L * W} B, o_shared {report['resident_bytes']} B, "
              f"floor {L * W / n:.0f} B, plain-TP shard {L * W // 2} B")


def test_adaptive_switch_adds_exactly_the_resident_slices(engines, tiny_model):
    """With the switch on, o_shared keeps its series byte for byte (owned +
    ring) and adds plain TP's slice of every layer for the small passes: the
    planner's figure. FlashComm2 alone holds exactly the full o_proj per layer
    (the small side reads a view of it: kept a plain tensor on CPU, not a copy)."""
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
    for rank in range(2):
        assert on[rank]["o_proj_storage_bytes"] == off[rank]["o_proj_storage_bytes"], rank
        assert on[rank]["series_report"] == off[rank]["series_report"], rank
        assert off[rank]["o_proj_resident_slice_bytes"] == 0
        assert on[rank]["o_proj_resident_slice_bytes"] == L * W // 2
        assert on[rank]["o_proj_resident_slice_bytes"] == planned["resident_slice_bytes"]
    assert max(w["series_report"]["resident_bytes"] + w["o_proj_resident_slice_bytes"]
               for w in on) == planned["ours_total_bytes"]
    fc2 = engines.run(arch, tp=2, env=flashcomm2_flags(1, adaptive=8)).rpc[MEMORY_RPC]
    for rank in range(2):
        assert fc2[rank]["o_proj_storage_bytes"] == L * W, fc2[rank]
