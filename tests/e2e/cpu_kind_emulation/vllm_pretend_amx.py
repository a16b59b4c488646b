"""A test-only vLLM plugin: vLLM CPU believes this CPU has AMX tiles, or not.

vLLM's CPU platform chooses ``AMX_MLA`` for every MLA model when
``torch.cpu._is_amx_tile_supported()`` is true (``vllm/platforms/cpu.py``),
in the engine process (block size) and in every worker (the backend), and its
int8 W8A8 kernel takes its AMX route by the same check
(``check_cpu_sgl_kernel``). This plugin answers ``VLLM_ASCEND_EXT_TEST_AMX``
(1: has AMX, the default; 0: has none) in all of them:

- 1 runs the AMX machine's backend selection, and its failures, on any CPU.
  It changes no kernel: a backend that really needs AMX is never reached in
  the cases that use it (they state ``CPU_MLA``);
- 0 sends an AMX machine down the non-AMX kernels (a CPU without AMX runs
  them natively), so both int8 paths run in CI wherever it runs.

Loaded through vLLM's own ``vllm.general_plugins`` entry point (this folder's
dist-info), in every engine and worker process, when the folder is on
PYTHONPATH.
"""

from __future__ import annotations


def register() -> None:
    import os

    import torch

    has_amx = os.environ.get("VLLM_ASCEND_EXT_TEST_AMX", "1") == "1"
    # The very function vLLM's CPU platform and kernels ask.
    torch.cpu._is_amx_tile_supported = lambda: has_amx
