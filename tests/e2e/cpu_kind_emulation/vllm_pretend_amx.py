"""A test-only vLLM plugin: vLLM CPU believes this CPU has AMX tiles.

vLLM's CPU platform chooses ``AMX_MLA`` for every MLA model when
``torch.cpu._is_amx_tile_supported()`` is true (``vllm/platforms/cpu.py``),
in the engine process (block size) and in every worker (the backend). This
plugin answers True in all of them, so the AMX machine's backend selection,
and its failures, run on any CPU. It changes no kernel: a backend that really
needs AMX is never reached in the cases that use it (they state ``CPU_MLA``).

Loaded through vLLM's own ``vllm.general_plugins`` entry point (this folder's
dist-info), in every engine and worker process, when the folder is on
PYTHONPATH.
"""

from __future__ import annotations


def register() -> None:
    import torch

    # The very function vLLM's CPU platform asks.
    torch.cpu._is_amx_tile_supported = lambda: True
