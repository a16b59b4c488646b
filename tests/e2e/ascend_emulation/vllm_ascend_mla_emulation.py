"""A test-only vLLM plugin that arranges vLLM CPU's MLA the way vllm-ascend does.

vllm-ascend's MLA wrapper (``vllm_ascend/ops/mla.py``, v0.25.1rc1 line 124;
main line 121) passes ``o_proj=mla_modules.o_proj`` into vLLM's
``MLAAttention``, which forwards it through its extra impl args to
``AscendMLAImpl``; the impl keeps it (``self.o_proj = kwargs["o_proj"]``,
``attention/mla_v1.py`` line 730) and runs the projection itself
(``self.o_proj(x, is_prefill=...)[0]``). vLLM's own CPU wrapper calls
``self.o_proj`` instead, so the private reference never matters on CPU, and a
swap that misses it looks fine there.

This plugin gives vLLM's CPU MLA the same shape: after vLLM builds each
``MultiHeadLatentAttentionWrapper``, its attention impl holds the o_proj as a
plain attribute, and the wrapper's projection goes through the impl's
reference. A stale ``impl.o_proj`` then runs weights that were never loaded.

Loaded through vLLM's own ``vllm.general_plugins`` entry point (this folder's
dist-info), in every engine and worker process, when the folder is on
PYTHONPATH.
"""

from __future__ import annotations


class ImplOProj:
    """The wrapper's o_proj call, routed through the impl's private reference
    (not an nn.Module, so it is no child the swap could find)."""

    def __init__(self, impl):
        self.impl = impl

    def __call__(self, x):
        return self.impl.o_proj(x)


def register() -> None:
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    build = MultiHeadLatentAttentionWrapper.__init__
    if getattr(build, "_ascend_mla_emulation", False):
        return

    def __init__(self, *args, **kwargs):
        build(self, *args, **kwargs)
        impl = self.mla_attn.impl
        impl.o_proj = self._modules.pop("o_proj")
        object.__setattr__(self, "o_proj", ImplOProj(impl))

    __init__._ascend_mla_emulation = True
    MultiHeadLatentAttentionWrapper.__init__ = __init__
