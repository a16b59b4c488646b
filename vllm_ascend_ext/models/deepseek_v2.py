"""DeepSeek-V2 / V3 (MLA) with the FlashComm2 o_proj.

vLLM's classes, unchanged except for ``FlashComm2ModelMixin``: the o_proj
inside vLLM's MLA wrapper (``layers/mla.py``) is replaced too, because the
wrapper holds the same module object.  The Ascend MLA implementation calls
``o_proj(x, is_prefill=...)[0]``; the FlashComm2 op accepts and ignores such
keyword arguments.
"""

from vllm.model_executor.models import deepseek_v2 as _vllm_deepseek

from vllm_ascend_ext.models.flashcomm2_install import FlashComm2ModelMixin


class DeepseekV2ForCausalLM(FlashComm2ModelMixin, _vllm_deepseek.DeepseekV2ForCausalLM):
    pass


class DeepseekV3ForCausalLM(FlashComm2ModelMixin, _vllm_deepseek.DeepseekV3ForCausalLM):
    pass
