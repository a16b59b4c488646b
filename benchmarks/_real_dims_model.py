"""The model ``bench_real_dims.py`` measures: DeepSeek-V3's real attention
dimensions (o_proj 16384 -> 7168, 224 MiB per layer in bf16) around a small
vocabulary, small experts and a small dense MLP, written once as a seeded bf16
safetensors checkpoint with transformers' own class; plus the layouts it is
served in and the TP size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

ARCH = "DeepseekV3ForCausalLM"
MIB = 1 << 20

#: DeepSeek-V3's attention dimensions (its config.json).
REAL_ATTENTION = dict(
    hidden_size=7168,
    num_attention_heads=128,
    num_key_value_heads=128,
    v_head_dim=128,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    kv_lora_rank=512,
    q_lora_rank=1536,
)
#: Kept small so two TP workers fit a 24 GB machine.
SMALL_REST = dict(
    vocab_size=2048,
    intermediate_size=512,  # the first_k_dense_replace dense layer(s)
    moe_intermediate_size=128,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    num_nextn_predict_layers=0,  # no MTP layer: not needed for memory
    initializer_range=0.006,  # V3's own (keeps bf16 activations finite at h=7168)
)
SEED = 1234
RECIPE = 1  # bump when the checkpoint recipe changes

CONFIGS = {
    "plain": ("plain TP2", {}),
    "fc2": ("FlashComm2 k=1 (replicated)", {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1"}),
    "oshared": ("FlashComm2 k=1 + o_shared", {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1",
                                              "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1"}),
}
TP = 2
PREFETCH_STEP = 1  # the flag's default


def checkpoint_dir(args) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    from vllm_ascend_ext.tools.tiny_models.factory import default_cache_root

    return default_cache_root() / f"real-dims-{ARCH}-L{args.layers}-r{RECIPE}"


def build_checkpoint(out: Path, layers: int) -> dict:
    """Seeded random bf16 checkpoint with V3's attention dims (reused if present)."""
    recipe = {"architecture": ARCH, "recipe": RECIPE, "seed": SEED, "layers": layers,
              **REAL_ATTENTION, **SMALL_REST}
    marker = out / "real_dims_model.json"
    if marker.exists() and json.loads(marker.read_text()).get("recipe") == recipe:
        return json.loads(marker.read_text())
    import torch
    import transformers

    from vllm_ascend_ext.tools.tiny_models import factory

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    factory.write_tokenizer(out)  # 512-token BPE; the model's vocab is larger (padding ids)
    kwargs = dict(factory.SPECS[ARCH].config_kwargs)
    kwargs.update(REAL_ATTENTION)
    kwargs.update(SMALL_REST)
    kwargs["num_hidden_layers"] = layers
    config = transformers.DeepseekV3Config(**kwargs)
    config.architectures = [ARCH]
    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built and initialised in bf16 directly
    try:
        model = transformers.DeepseekV3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    del model
    factory.write_model_config(config, out, "bfloat16")
    info = {
        "recipe": recipe,
        "parameters": n_params,
        "safetensors_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "build_seconds": time.perf_counter() - t0,
    }
    marker.write_text(json.dumps(info, indent=2))
    return info
