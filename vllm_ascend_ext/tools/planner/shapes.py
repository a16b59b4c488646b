"""The o_proj-relevant shape of a model: presets and Hugging Face ``config.json`` parsing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_ascend_ext.tools.planner.errors import PlanError

__all__ = ["MOE_EXPERT_KEYS", "PRESETS", "ModelShape", "load_model_shape", "shape_from_config"]


@dataclass(frozen=True)
class ModelShape:
    name: str
    architecture: str
    num_layers: int  # hidden layers (MTP layers never join the series)
    hidden_size: int  # h: o_proj output
    num_heads: int
    o_head_dim: int  # v_head_dim (MLA) or head_dim
    is_moe: bool = False  # MoE: vLLM steps DP replicas in lockstep

    @property
    def o_proj_in(self) -> int:
        """a = heads x per-head value size: o_proj's input features."""
        return self.num_heads * self.o_head_dim


#: Keys under which Hugging Face configs give the number of (routed) experts.
MOE_EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")

#: Real config numbers of the published checkpoints.
PRESETS: dict[str, ModelShape] = {
    # config.json: num_hidden_layers 61, hidden_size 7168, num_attention_heads
    # 128, v_head_dim 128 -> o_proj 16384 x 7168.
    "deepseek-v3": ModelShape(
        "DeepSeek-V3", "DeepseekV3ForCausalLM", 61, 7168, 128, 128, is_moe=True),
    # 94 layers, hidden 4096, 64 heads x head_dim 128 -> o_proj 8192 x 4096.
    "qwen3-235b-a22b": ModelShape(
        "Qwen3-235B-A22B", "Qwen3MoeForCausalLM", 94, 4096, 64, 128, is_moe=True),
    # 64 layers, hidden 5120, 64 heads x head_dim 128 -> o_proj 8192 x 5120.
    "qwen3-32b": ModelShape(
        "Qwen3-32B", "Qwen3ForCausalLM", 64, 5120, 64, 128, is_moe=False),
}


def shape_from_config(cfg: dict[str, Any], name: str = "config.json") -> ModelShape:
    """The o_proj-relevant shape of a Hugging Face ``config.json`` dict."""
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        cfg = {**cfg, **cfg["text_config"]}
    try:
        layers = int(cfg["num_hidden_layers"])
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
    except KeyError as e:
        raise PlanError(f"{name}: missing {e.args[0]!r}; is this a decoder config.json?") from None
    if cfg.get("v_head_dim"):  # MLA (DeepSeek V2/V3): o_proj sees heads x v_head_dim
        head_dim = int(cfg["v_head_dim"])
    elif cfg.get("head_dim"):
        head_dim = int(cfg["head_dim"])
    else:
        if hidden % heads:
            raise PlanError(f"{name}: hidden_size {hidden} is not a multiple of {heads} heads")
        head_dim = hidden // heads
    arch = (cfg.get("architectures") or ["unknown"])[0]
    is_moe = any(
        isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool) and cfg[key] > 0
        for key in MOE_EXPERT_KEYS
    )
    return ModelShape(name, arch, layers, hidden, heads, head_dim, is_moe=is_moe)


def load_model_shape(model: str) -> ModelShape:
    """A preset name, a ``config.json`` path, or a folder holding one."""
    key = model.lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(
            f"{model!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
            "nor a config.json / model folder"
        )
    return shape_from_config(json.loads(path.read_text()), name=str(path))
