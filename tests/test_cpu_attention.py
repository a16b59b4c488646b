"""Every engine the project starts states its CPU MLA backend by dtype."""

from __future__ import annotations

import pytest

from vllm_ascend_ext import cpu_attention
from vllm_ascend_ext.cpu_attention import AMX_MLA, CPU_MLA, cpu_attention_backend, mla_backend
from vllm_ascend_ext.tools.local_server import VllmServer

# Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
pytestmark = pytest.mark.vllm_independent


@pytest.mark.parametrize("dtype,amx,want", [
    ("float32", True, CPU_MLA),     # AMX_MLA packs bf16/fp16/int8 only
    ("float32", False, CPU_MLA),
    ("torch.float32", True, CPU_MLA),
    ("bfloat16", True, AMX_MLA),    # the fast path where the CPU has it
    ("bfloat16", False, CPU_MLA),
    ("float16", True, AMX_MLA),
])
def test_mla_backend_follows_dtype_and_cpu(dtype, amx, want):
    assert mla_backend(dtype, amx=amx) == want


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype 'int4'"):
        mla_backend("int4", amx=True)


def test_only_mla_checkpoints_get_a_backend(tiny_model):
    assert cpu_attention_backend(tiny_model("DeepseekV3ForCausalLM"), "float32") == CPU_MLA
    assert cpu_attention_backend(tiny_model("DeepseekV2ForCausalLM"), "float32") == CPU_MLA
    assert cpu_attention_backend(tiny_model("Qwen3ForCausalLM"), "float32") is None


@pytest.mark.parametrize("amx", [True, False])
def test_served_mla_model_states_its_backend(tiny_model, monkeypatch, amx):
    monkeypatch.setattr(cpu_attention, "cpu_has_amx", lambda: amx)
    ds = str(tiny_model("DeepseekV3ForCausalLM"))
    cmd = VllmServer(model=ds, tp=2).command()
    assert cmd[cmd.index("--attention-backend") + 1] == CPU_MLA
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    bf16 = VllmServer(model=ds, tp=2, dtype="bfloat16").command()
    assert bf16[bf16.index("--attention-backend") + 1] == (AMX_MLA if amx else CPU_MLA)
    qwen = VllmServer(model=str(tiny_model("Qwen3ForCausalLM")), tp=2).command()
    assert "--attention-backend" not in qwen


def test_a_speculative_draft_gets_the_same_backend():
    """vLLM resets a draft's backend to the speculative config's own
    (vLLM 0.32 ``_create_draft_vllm_config``), so it is stated there too."""
    from vllm_ascend_ext.cpu_attention import draft_speculative_config

    mtp = {"method": "deepseek_mtp", "num_speculative_tokens": 1}
    assert draft_speculative_config(mtp, CPU_MLA) == {**mtp, "attention_backend": CPU_MLA}
    assert draft_speculative_config(mtp, None) == mtp  # non-MLA: nothing to state
    assert draft_speculative_config(None, CPU_MLA) is None
    # A backend the user put there wins.
    own = {**mtp, "attention_backend": "AMX_MLA"}
    assert draft_speculative_config(own, CPU_MLA) == own


def test_served_speculative_config_states_the_draft_backend(tiny_model):
    import json

    ds = str(tiny_model("DeepseekV3ForCausalLM"))
    cmd = VllmServer(model=ds, tp=2, speculative_config={
        "method": "deepseek_mtp", "num_speculative_tokens": 2}).command()
    spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert spec == {"method": "deepseek_mtp", "num_speculative_tokens": 2,
                    "attention_backend": CPU_MLA}
    assert "--disable-log-stats" in cmd
    assert "--disable-log-stats" not in VllmServer(model=ds, log_stats=True).command()
