"""vllm-ascend-ext: FlashComm2 o_proj with o_shared weight sharing for vLLM.

vLLM discovers this package through the ``vllm.general_plugins`` entry point
and calls :func:`register` in every process (front-end, engine core and each
worker) before any model is built.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """vLLM general-plugin entry point. Idempotent."""
    global _registered
    if _registered:
        return
    from vllm_ascend_ext.builtin_flashcomm2 import check_no_builtin_flashcomm2
    from vllm_ascend_ext.version_check import check_vllm_version

    # First: a vllm-ascend with its own FlashComm2 also has an older vLLM, and
    # the conflict is the more useful message.
    check_no_builtin_flashcomm2()
    check_vllm_version()
    from vllm_ascend_ext.models import register_models

    register_models()
    _registered = True
