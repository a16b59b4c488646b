"""Which attention backend an engine on *this* CPU is started with.

vLLM's CPU platform picks the MLA backend from the CPU it runs on: with AMX
tiles (Intel Xeon since Sapphire Rapids) it takes ``AMX_MLA`` for every MLA
model unless ``CPU_MLA`` is asked for (``vllm/platforms/cpu.py``,
``get_attn_backend_cls``).  ``AMX_MLA`` packs weights for bf16/fp16/int8
only, so an fp32 DeepSeek dies at load on an AMX CPU and runs on any other.
The project's engine launchers (demo, local server, tests, benchmarks) never
leave that to chance: they ask for the backend that fits the dtype, through
the functions below.

- fp32 MLA: ``CPU_MLA`` (the only CPU MLA backend that takes fp32).
- bf16 / fp16 MLA: ``AMX_MLA`` where the CPU has AMX (the fast path a CPU user
  gets), ``CPU_MLA`` elsewhere.
- Non-MLA models: vLLM CPU has one backend (``CPU_ATTN``); nothing to choose.
"""

from __future__ import annotations

import json
from pathlib import Path

CPU_MLA = "CPU_MLA"
AMX_MLA = "AMX_MLA"

#: The CPU flag that vLLM's AMX kernels need, named in skip reasons.
AMX_FEATURE = "amx_tile"

_HALF_DTYPES = frozenset({"bfloat16", "bf16", "float16", "fp16", "half"})
_FULL_DTYPES = frozenset({"float32", "fp32", "float", "auto"})


def cpu_has_amx() -> bool:
    """True when the CPU has AMX tiles, by the very check vLLM's CPU platform
    makes (``torch.cpu._is_amx_tile_supported``); falls back to the kernel's
    CPU flags when torch is not importable."""
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError):
        return AMX_FEATURE in cpuinfo_flags()


def cpuinfo_flags() -> set[str]:
    """The CPU's feature flags as the kernel lists them (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model_name() -> str:
    """The CPU's model name (for logs, benchmarks and skip reasons)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def is_mla_checkpoint(model_dir: str | Path) -> bool:
    """A DeepSeek-style latent-attention checkpoint (``kv_lora_rank`` set)."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        return False
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)
    return cfg.get("kv_lora_rank") is not None


def mla_backend(dtype: str, *, amx: bool | None = None) -> str:
    """The CPU MLA backend for weights of ``dtype`` on this CPU (or on a CPU
    with/without AMX when ``amx`` is given)."""
    d = str(dtype).removeprefix("torch.").lower()
    if d in _FULL_DTYPES:
        return CPU_MLA
    if d not in _HALF_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    return AMX_MLA if (cpu_has_amx() if amx is None else amx) else CPU_MLA


def cpu_attention_backend(model_dir: str | Path, dtype: str) -> str | None:
    """The backend to request for ``model_dir`` at ``dtype``, or None when the
    model has no choice to make (non-MLA)."""
    return mla_backend(dtype) if is_mla_checkpoint(model_dir) else None


def draft_speculative_config(speculative_config: dict | None,
                             backend: str | None) -> dict | None:
    """``speculative_config`` with the draft's attention backend stated too.

    vLLM builds a draft model (DeepSeek's MTP layer, EAGLE heads) with a copy
    of the engine config whose attention backend is reset to the speculative
    config's own ``attention_backend`` (``_create_draft_vllm_config`` in
    ``vllm/v1/spec_decode/llm_base_proposer.py``, vLLM 0.32: the draft
    "never inherits" it). Left unset, the draft picks its backend from the CPU
    model again, and an fp32 MTP draft dies on an AMX CPU. A backend the
    caller already put in the speculative config wins.
    """
    if speculative_config is None or backend is None:
        return speculative_config
    return {"attention_backend": backend, **speculative_config}
