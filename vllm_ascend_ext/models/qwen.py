"""Qwen2, Qwen3 and Qwen3-MoE with the FlashComm2 o_proj (vLLM's classes +
``FlashComm2ModelMixin``)."""

from vllm.model_executor.models import qwen2 as _vllm_qwen2
from vllm.model_executor.models import qwen3 as _vllm_qwen3
from vllm.model_executor.models import qwen3_moe as _vllm_qwen3_moe

from vllm_ascend_ext.models.flashcomm2_install import FlashComm2ModelMixin


class Qwen2ForCausalLM(FlashComm2ModelMixin, _vllm_qwen2.Qwen2ForCausalLM):
    pass


class Qwen3ForCausalLM(FlashComm2ModelMixin, _vllm_qwen3.Qwen3ForCausalLM):
    pass


class Qwen3MoeForCausalLM(FlashComm2ModelMixin, _vllm_qwen3_moe.Qwen3MoeForCausalLM):
    pass
