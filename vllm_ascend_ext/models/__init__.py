"""Model classes that place the FlashComm2 o_proj (and o_shared) into vLLM models."""

from __future__ import annotations


def register_models() -> None:
    """Register our model classes with vLLM's ModelRegistry (filled in by the
    model-integration work; until then vLLM's own classes serve every model)."""
