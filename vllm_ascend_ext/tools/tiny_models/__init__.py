"""Tiny real checkpoints (transformers classes + a locally trained tokenizer)."""

from vllm_ascend_ext.tools.tiny_models.factory import (
    ARCHITECTURES,
    make_tiny_checkpoint,
    resolve_architecture,
    tiny_checkpoint,
)

__all__ = ["ARCHITECTURES", "make_tiny_checkpoint", "resolve_architecture", "tiny_checkpoint"]
