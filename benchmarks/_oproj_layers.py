"""The o_proj stand-ins every o_shared benchmark builds: vLLM's own
``ReplicatedLinear`` layers named like a model's o_projs, loaded and finalised
through vLLM's weight loader and post-load pass, so a series registered on
them runs the same life cycle as inside a model.
"""

from __future__ import annotations


def make_layers(start, L, dim_out, dim_in, hooks_inside):
    """L o_proj layers, prefixes ``model.layers.{start..}.self_attn.o_proj``.

    ``hooks_inside=False`` marks them as placing the series' hooks
    themselves, so a benchmark can time ``wait`` / ``prefetch_after`` alone.
    """
    import torch
    from vllm.model_executor.layers.linear import ReplicatedLinear

    cls = ReplicatedLinear
    if not hooks_inside:

        class ManualHooksLinear(ReplicatedLinear):
            places_shared_weight_hooks = True

        cls = ManualHooksLinear
    layers = []
    for i in range(start, start + L):
        layer = cls(dim_in, dim_out, bias=False, params_dtype=torch.float32,
                    prefix=f"model.layers.{i}.self_attn.o_proj")
        # same GEMM (F.linear) for shared and replicated layers: o_shared sets
        # this flag at registration, so the baseline must use it as well
        layer._cpu_skip_gemm_dispatch = True
        layers.append(layer)
    return layers


def load_and_finalise(layers, dim_out, dim_in):
    """Seeded weights (one generator per layer index), then the post-load pass."""
    import torch

    for layer in layers:
        idx = int(layer.prefix.split(".")[2])
        g = torch.Generator().manual_seed(idx)
        layer.weight.weight_loader(layer.weight, torch.randn(dim_out, dim_in, generator=g))
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)

