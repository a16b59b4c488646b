"""The engine configurations of the vllm-ascend leg, built by vLLM's own
``EngineArgs`` under vllm-ascend's ``NPUPlatform`` (its
``check_and_update_config`` runs), from this project's tiny model configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: FlashComm2 k=1 with o_shared (prefetch step 1), through additional_config.
FLAGS = {"enable_flashcomm2_parallel_size": 1, "layer_sharding": ["o_proj"]}


def tiny_config_dir(arch: str, out: Path) -> Path:
    """A folder with the tiny model's ``config.json`` only (no weights: the
    tests load their own o_proj tensors). DeepSeek is made dense: vllm-ascend's
    MoE layers put tensors on the NPU while they are built (``.npu()`` in
    ``ops/fused_moe/routed_experts.py``), and the contracts concern attention."""
    from vllm_ascend_ext.tools.tiny_models.factory import build_config, write_model_config

    config = build_config(arch)
    if hasattr(config, "first_k_dense_replace"):
        config.first_k_dense_replace = config.num_hidden_layers
    out.mkdir(parents=True, exist_ok=True)
    write_model_config(config, out, "float32")
    return out


def engine_config(model_dir: Path, tp: int, *, additional_config: dict | None = None,
                  enforce_eager: bool = True) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), tensor_parallel_size=tp, dtype="float32",
                      enforce_eager=enforce_eager, skip_tokenizer_init=True,
                      additional_config=dict(additional_config or {})).create_engine_config()


def build_configs(tmp: Path) -> dict[str, Any]:
    deepseek = tiny_config_dir("DeepseekV3ForCausalLM", tmp / "deepseek-v3-dense")
    qwen = tiny_config_dir("Qwen3ForCausalLM", tmp / "qwen3")
    return {
        "deepseek": engine_config(deepseek, 2, additional_config=FLAGS),
        "qwen": engine_config(qwen, 2, additional_config=FLAGS),
        "qwen_tp4": engine_config(qwen, 4),
    }
