"""The upstream-named module functions on real Hugging Face configs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn
from transformers import LlavaConfig, Qwen2Config, Qwen2VLConfig
from vllm.transformers_utils.config import get_hf_text_config

from vllm_ascend_ext.ops.shared_weight.upstream_api import is_hidden_layer


def _vllm_config(hf_config):
    # The two attributes vLLM's ModelConfig derives from a checkpoint's config:
    # the config as loaded, and its language-model part (get_hf_text_config).
    return SimpleNamespace(model_config=SimpleNamespace(
        hf_config=hf_config, hf_text_config=get_hf_text_config(hf_config)))


def _layer(index: int) -> nn.Module:
    layer = nn.Linear(2, 2)
    layer.prefix = f"model.language_model.layers.{index}.self_attn.o_proj"
    return layer


@pytest.mark.parametrize("hf_config", [Qwen2VLConfig(), LlavaConfig(), Qwen2Config()],
                         ids=["qwen2_vl", "llava", "qwen2_text_only"])
def test_is_hidden_layer_reads_the_text_config(hf_config):
    # Multimodal configs keep num_hidden_layers only in their text config.
    n = get_hf_text_config(hf_config).num_hidden_layers
    cfg = _vllm_config(hf_config)
    assert is_hidden_layer(cfg, _layer(0))
    assert is_hidden_layer(cfg, _layer(n - 1))
    assert not is_hidden_layer(cfg, _layer(n))  # an MTP layer sits past the decoder
