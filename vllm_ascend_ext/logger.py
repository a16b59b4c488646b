"""Loggers that write where vLLM's own lines go.

vLLM configures only the ``vllm`` logger namespace (handler, format, level
from ``VLLM_LOGGING_LEVEL``); a logger named ``vllm_ascend_ext.*`` would be
silent at INFO.  Ours live under ``vllm.ext.`` so the start-up lines a user
looks for (effective settings, o_proj memory) appear in the server log.
"""

from __future__ import annotations


def init_logger(name: str):
    from vllm.logger import init_logger as vllm_init_logger

    return vllm_init_logger(f"vllm.ext.{name}")
