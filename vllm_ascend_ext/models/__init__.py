"""Model classes that place the FlashComm2 o_proj (and o_shared) into vLLM models.

Registered lazily (``module:Class`` strings), so the front-end process never
imports model code; vLLM imports it in the workers.
"""

from __future__ import annotations

# architecture -> "module:Class"
MODEL_CLASSES = {
    "DeepseekV2ForCausalLM": "vllm_ascend_ext.models.deepseek_v2:DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "vllm_ascend_ext.models.deepseek_v2:DeepseekV3ForCausalLM",
    "Qwen2ForCausalLM": "vllm_ascend_ext.models.qwen:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "vllm_ascend_ext.models.qwen:Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "vllm_ascend_ext.models.qwen:Qwen3MoeForCausalLM",
}


def register_models() -> None:
    from vllm import ModelRegistry

    for arch, target in MODEL_CLASSES.items():
        ModelRegistry.register_model(arch, target)
