"""Each FlashComm2 o_proj's forward reads one runtime record (ops/oproj_runtime.py).

On a real 2-rank gloo world, o_shared FlashComm2 layers on both storages
(round-robin and TP shards) are built as the model install builds them. The
record is resolved at load: the store's ring and the layer's position in it,
reachable from the int the custom ops take. Forwards then need nothing else:
with every name look-up of the shared-weight registry made to fail, they still
equal FlashComm2 without o_shared. Before loading and after the store closes,
a forward fails naming the layer.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

A, H, LAYERS = 32, 24, 3


def _build(cfg, store, start_name: str):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.models.flashcomm2_install import flashcomm2_o_proj_for, join_series
    from vllm_ascend_ext.ops.tp_shard.storage import TPShardStorage

    layers = []
    with set_current_vllm_config(VllmConfig()):
        for i in range(LAYERS):
            name = f"model.layers.{i}.self_attn.o_proj"
            old = RowParallelLinear(A, H, bias=True, params_dtype=torch.float32, prefix=name)
            new = flashcomm2_o_proj_for(old, cfg, name)
            if isinstance(store, TPShardStorage):
                store.add_layer(new, old, i)
            elif store is not None:
                join_series(new, old, cfg, store, i)
            layers.append(new)
    g = torch.Generator().manual_seed(7)
    for layer in layers:
        w, b = torch.randn(H, A, generator=g), torch.randn(H, generator=g)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
    return layers


def _post_load(layers) -> None:
    for layer in layers:
        for module in layer.modules():  # vLLM's pass: the layer, then any slice
            module.quant_method.process_weights_after_loading(module)


def _error_of(fn) -> str | None:
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return None


def _worker(rank, world_size, storage):
    from vllm.model_executor.layers.linear import RowParallelLinear

    import vllm_ascend_ext.ops.shared_weight.registry as registry
    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import (
        destroy_flashcomm2_groups,
        get_flashcomm2_odp_group,
        get_flashcomm2_oshared_group,
        init_flashcomm2_groups,
    )
    from vllm_ascend_ext.ops.oproj_runtime import runtime_at
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries
    from vllm_ascend_ext.ops.tp_shard.specs import shard_specs_for
    from vllm_ascend_ext.ops.tp_shard.storage import TPShardStorage

    cfg = FlashComm2Config(1, True, 1, adaptive_tokens=0)
    init_flashcomm2_groups(cfg, dp_lockstep=False)
    try:
        if storage == "round_robin":
            store = SharedWeightSeries(f"runtime-{storage}", get_flashcomm2_oshared_group(), 1)
        else:
            probe = RowParallelLinear(A, H, bias=True, params_dtype=torch.float32)
            store = TPShardStorage(f"runtime-{storage}", get_flashcomm2_odp_group(), 1,
                                   shard_specs_for(probe))
        layers = _build(cfg, store, storage)
        alone = _build(FlashComm2Config(1, False, 1, adaptive_tokens=0), None, storage)
        a_l = A // world_size
        x = torch.randn(6, A, generator=torch.Generator().manual_seed(1))
        x = x[:, rank * a_l:(rank + 1) * a_l].contiguous()

        early = _error_of(lambda: layers[0](x))
        _post_load(layers)
        _post_load(alone)
        bound = [{"store": rt.store is store, "ring": rt.ring is store.ring,
                  "position": rt.position, "indexed": runtime_at(rt.index) is rt}
                 for rt in (layer.runtime for layer in layers)]

        def no_names(*args, **kwargs):
            raise AssertionError("a forward looked an o_shared store up by name")

        saved = registry.SharedWeightRegistry.get, registry.SharedWeightRegistry.find
        registry.SharedWeightRegistry.get = registry.SharedWeightRegistry.find = no_names
        try:
            errs = []
            for _ in range(2):  # the second pass wraps the ring
                for layer, ref in zip(layers, alone):
                    y, r = layer(x)[0], ref(x)[0]
                    errs.append(float((y - r).abs().max() / r.abs().max()))
        finally:
            registry.SharedWeightRegistry.get, registry.SharedWeightRegistry.find = saved
        store.close()
        closed = _error_of(lambda: layers[1](x))
        return {"early": early, "bound": bound, "errs": errs, "closed": closed}
    finally:
        destroy_flashcomm2_groups()


@pytest.mark.parametrize("storage", ["round_robin", "tp_shard"])
def test_forward_reads_only_its_runtime_record(storage):
    for rank, res in enumerate(run_distributed(_worker, 2, storage)):
        name = "'model.layers.0.self_attn.o_proj'"
        assert res["early"] is not None and res["early"].startswith(name), res["early"]
        assert "has not bound this layer yet" in res["early"], res["early"]
        assert res["bound"] == [{"store": True, "ring": True, "position": p, "indexed": True}
                                for p in range(LAYERS)], (rank, res["bound"])
        assert max(res["errs"]) < 1e-6, (rank, res["errs"])
        assert res["closed"] is not None and "is closed" in res["closed"], res["closed"]
        assert res["closed"].startswith("'model.layers.1.self_attn.o_proj'"), res["closed"]
