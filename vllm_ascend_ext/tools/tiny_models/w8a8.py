"""W8A8 tiny checkpoints in vLLM's compressed-tensors format, built locally.

Made from a saved fp32 tiny checkpoint (``factory.py``): every targeted linear
weight ``W [N, K]`` becomes int8 with one fp32 scale per output channel,

    scale[n] = max_k |W[n, k]| / 127,   q = round(W / scale).clamp(-127, 127),

and activations are quantized to int8 symmetrically, either per token at run
time (``dynamic``) or with one calibrated scale per layer (``static``: the
largest input magnitude the fp32 model sees on the shipped corpus, / 127) —
the ``CompressedTensorsW8A8Int8`` scheme that vLLM CPU runs through its int8
kernels. Which layers are quantized:

- Qwen family: every linear layer of the decoder (``Linear``; ``lm_head``
  stays fp32), so o_proj, fused QKV and MLP all run int8;
- DeepSeek: the attention ``o_proj`` only (``re:.*self_attn\\.o_proj$``): MLA's
  ``kv_b_proj`` is absorbed into the attention kernel and the MoE experts take
  another method, neither of which this project changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

W8A8_RECIPE = 1
ACTIVATIONS = ("dynamic", "static")

QWEN_TARGETS = ("Linear",)
DEEPSEEK_TARGETS = (r"re:.*self_attn\.o_proj$",)


def _targets(arch: str) -> tuple[str, ...]:
    return DEEPSEEK_TARGETS if arch.startswith("Deepseek") else QWEN_TARGETS


def _is_target(name: str, arch: str) -> bool:
    if not name.endswith(".weight") or not name.startswith("model.layers."):
        return False
    module = name.removesuffix(".weight")
    if arch.startswith("Deepseek"):
        return module.endswith("self_attn.o_proj")
    leaf = module.rsplit(".", 1)[-1]
    return leaf in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj"}


def quantization_config(arch: str, activations: str = "dynamic") -> dict:
    """The ``quantization_config`` block vLLM's compressed-tensors config reads."""
    act = ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
            "dynamic": True} if activations == "dynamic" else
           {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
            "dynamic": False})
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": list(_targets(arch)),
                "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                            "strategy": "channel", "dynamic": False},
                "input_activations": act,
            }
        },
    }


def quantize_per_channel(w):
    """int8 weight and fp32 per-output-channel scale ``[N, 1]`` of ``w [N, K]``."""
    import torch

    w = w.to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def calibrate_input_scales(src: Path, arch: str) -> dict:
    """Per target layer: the largest input magnitude over the corpus, / 127
    (fp32 transformers, every corpus line as one sequence)."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    from vllm_ascend_ext.tools.tiny_models.corpus import corpus_text

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(src), dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    absmax: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _is_target(name + ".weight", arch):
            def hook(mod, inputs, output, _name=name):
                m = float(inputs[0].abs().max())
                absmax[_name] = max(absmax.get(_name, 0.0), m)
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for line in corpus_text().splitlines():
            if line.strip():
                model(torch.tensor([tok.encode(line).ids]))
    for h in hooks:
        h.remove()
    return {name: torch.tensor([m / 127.0], dtype=torch.float32) for name, m in absmax.items()}


def make_w8a8_checkpoint(src: str | Path, out: str | Path, *, activations: str = "dynamic",
                         force: bool = False) -> Path:
    """Write the W8A8 version of the fp32 checkpoint ``src`` into ``out``."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r}: expected one of {ACTIVATIONS}")
    src, out = Path(src), Path(out)
    marker = out / "tiny_w8a8.json"
    src_recipe = json.loads((src / "tiny_model.json").read_text())
    recipe = {"w8a8_recipe": W8A8_RECIPE, "activations": activations, "source": src_recipe}
    if not force and marker.exists() and json.loads(marker.read_text()) == recipe:
        return out
    from vllm_ascend_ext.tools.tiny_models.factory import exclusive_build

    with exclusive_build(out):
        # Another process may have built it while this one waited.
        if force or not (marker.exists() and json.loads(marker.read_text()) == recipe):
            _write_w8a8_checkpoint(src, out, marker, recipe, activations)
    return out


def _write_w8a8_checkpoint(src: Path, out: Path, marker: Path, recipe: dict,
                           activations: str) -> None:
    from safetensors.torch import load_file, save_file

    src_recipe = recipe["source"]
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "tiny_*.json"))
    arch = src_recipe["architecture"]
    input_scales = calibrate_input_scales(src, arch) if activations == "static" else {}
    for shard in sorted(src.glob("*.safetensors")):
        state = load_file(str(shard))
        for name in [n for n in state if _is_target(n, arch)]:
            module = name.removesuffix(".weight")
            q, scale = quantize_per_channel(state[name])
            state[name] = q
            state[module + ".weight_scale"] = scale
            if activations == "static":
                state[module + ".input_scale"] = input_scales[module]
        save_file(state, str(out / shard.name), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(arch, activations)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    marker.write_text(json.dumps(recipe))


def tiny_w8a8_checkpoint(arch: str, root: str | Path | None = None, *,
                         activations: str = "dynamic") -> Path:
    """Path of the cached W8A8 tiny checkpoint for ``arch``, built on first use."""
    from vllm_ascend_ext.tools.tiny_models.factory import (
        default_cache_root,
        resolve_architecture,
        tiny_checkpoint,
    )

    arch = resolve_architecture(arch)
    root = Path(root) if root is not None else default_cache_root()
    src = tiny_checkpoint(arch, root)
    suffix = "" if activations == "dynamic" else f"-{activations}"
    return make_w8a8_checkpoint(
        src, root / f"{src.name}-w8a8{suffix}-r{W8A8_RECIPE}",
        activations=activations)
