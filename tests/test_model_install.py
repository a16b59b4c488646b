"""install_flashcomm2 on a real (small) vLLM module tree, 2 gloo ranks:
which o_projs are replaced, MTP filtering, the MLA double reference, the
series, and "flags off means vLLM's model untouched"."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from tests.dist_utils import run_distributed

NUM_HIDDEN = 3  # layers 0..2 are hidden layers; layer 3 plays DeepSeek's MTP layer


class AscendStyleImpl:
    """What vllm-ascend's AscendMLAImpl does with its o_proj: it is handed the
    module through MLAAttention's extra impl args and keeps it as a plain
    attribute (``self.o_proj = kwargs["o_proj"]``); the impl is no nn.Module."""

    def __init__(self, **kwargs):
        self.o_proj = kwargs["o_proj"]


class UnknownHolder:
    """A holder nobody told us about."""

    def __init__(self, o_proj):
        self.cached_projection = o_proj


def _toy_model(unknown_holder: bool = False):
    import torch.nn as nn
    from vllm.model_executor.layers.linear import RowParallelLinear

    class Attn(nn.Module):
        def __init__(self, prefix):
            super().__init__()
            self.o_proj = RowParallelLinear(64, 32, bias=False, prefix=f"{prefix}.o_proj")
            # vLLM's MLA wrapper holds the very same o_proj object.
            self.mla_attn = nn.Module()
            self.mla_attn.o_proj = self.o_proj
            # vllm-ascend's MLA path: MLAAttention(...).impl keeps it too.
            self.mla_attn.attn = nn.Module()
            self.mla_attn.attn.impl = AscendStyleImpl(o_proj=self.o_proj)
            if unknown_holder:
                self.mla_attn.attn.extra = UnknownHolder(self.o_proj)

    class Layer(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.self_attn = Attn(f"model.layers.{i}.self_attn")

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([Layer(i) for i in range(NUM_HIDDEN + 1)])
    return model


def _vllm_config(tp: int, additional_config: dict | None = None):
    hf = SimpleNamespace(num_hidden_layers=NUM_HIDDEN, architectures=["DeepseekV3ForCausalLM"])
    return SimpleNamespace(
        additional_config=additional_config or {},
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1,
                                        data_parallel_size=1),
        model_config=SimpleNamespace(hf_config=hf, hf_text_config=hf),
    )


def _install_worker(rank, world_size, additional_config, unknown_holder=False):
    import weakref

    from vllm_ascend_ext.distributed.parallel_state import destroy_flashcomm2_groups
    from vllm_ascend_ext.models.flashcomm2_install import (
        StaleOProjReference,
        install_flashcomm2,
    )

    model = _toy_model(unknown_holder)
    old = [weakref.ref(l.self_attn.o_proj) for l in model.model.layers]
    try:
        state = install_flashcomm2(model, _vllm_config(world_size, additional_config))
    except StaleOProjReference as e:
        destroy_flashcomm2_groups()
        return {"error": str(e)}
    out = {"state": state is not None}
    if state is not None:
        layers = model.model.layers
        out["classes"] = [type(l.self_attn.o_proj).__name__ for l in layers]
        out["mla_same_object"] = [l.self_attn.mla_attn.o_proj is l.self_attn.o_proj for l in layers]
        out["impl_same_object"] = [l.self_attn.mla_attn.attn.impl.o_proj is l.self_attn.o_proj
                                   for l in layers]
        out["old_alive"] = [r() is not None for r in old]
        # Under the adaptive switch o_shared keeps vLLM's o_proj as the
        # layer's resident slice (ops/resident_slice.py): alive, held only there.
        out["kept_as_slice"] = [r() is not None and getattr(l.self_attn.o_proj, "_modules", {})
                                .get("resident_slice") is r() for r, l in zip(old, layers)]
        out["prefixes"] = state.o_proj_prefixes
        series = state.series
        out["series_layers"] = None if series is None else series.layer_indices
        out["storage"] = state.storage
        # Non-owned members hold no weight before loading.
        out["weight_numel"] = [l.self_attn.o_proj.weight.numel() for l in layers]
        state.close()
    destroy_flashcomm2_groups()
    return out


def test_flags_off_leaves_vllm_model_untouched():
    (r0, r1) = run_distributed(_install_worker, 2, {}, tp_size=2)
    assert r0 == r1 == {"state": False}


@pytest.mark.parametrize("adaptive,storage", [(0, None), (None, None), (0, "round_robin"),
                                              (None, "round_robin")],
                         ids=["threshold 0", "default threshold", "round-robin threshold 0",
                              "round-robin default threshold"])
def test_install_replaces_hidden_o_projs_only_and_builds_the_series(adaptive, storage):
    cfg = {"enable_flashcomm2_parallel_size": 1, "layer_sharding": ["o_proj"]}
    if adaptive is not None:
        cfg["flashcomm2_adaptive_tokens"] = adaptive
    if storage is not None:
        cfg["flashcomm2_oshared_storage"] = storage
    results = run_distributed(_install_worker, 2, cfg, tp_size=2)
    tp_shard = storage is None  # auto: one replica, so TP shards
    for rank, r in enumerate(results):
        assert r["storage"] == ("tp_shard" if tp_shard else "round_robin")
        assert r["classes"] == ["FlashComm2RowParallelLinear"] * NUM_HIDDEN + ["RowParallelLinear"]
        assert all(r["mla_same_object"]), "MLA wrapper kept a stale o_proj"
        # vllm-ascend's impl.o_proj follows the swap; the replaced modules are
        # freed, or (default threshold) kept only as the resident slice.
        assert all(r["impl_same_object"]), "the attention impl kept a stale o_proj"
        # TP shards keep vLLM's o_proj as the storage of every layer; round-robin
        # keeps it only for the adaptive switch's small steps.
        slices = tp_shard or adaptive is None
        assert r["old_alive"] == [slices] * NUM_HIDDEN + [True]
        assert r["kept_as_slice"] == [slices] * NUM_HIDDEN + [False]
        assert r["prefixes"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(NUM_HIDDEN)]
        assert r["series_layers"] == list(range(NUM_HIDDEN))
        # Round-robin, k=1: full 64x32 o_proj on its owner (layer % 2); TP
        # shards: no FlashComm2 storage at all. The MTP layer 3 keeps its TP shard.
        owned = [64 * 32 if i % 2 == rank and not tp_shard else 0 for i in range(NUM_HIDDEN)]
        assert r["weight_numel"] == owned + [32 * 32]


def test_an_unknown_holder_of_the_old_o_proj_stops_start_up():
    cfg = {"enable_flashcomm2_parallel_size": 1, "layer_sharding": ["o_proj"]}
    for r in run_distributed(_install_worker, 2, cfg, True, tp_size=2):
        msg = r["error"]
        assert "something still holds the old ones" in msg
        for i in range(NUM_HIDDEN):
            # exactly the unknown holder, named by class and attribute
            assert re.search(rf"model\.layers\.{i}\.self_attn\.o_proj: held by "
                             r"[\w.]*UnknownHolder\.cached_projection\n", msg + "\n"), msg


def test_bad_config_fails_before_any_group_is_built():
    from vllm_ascend_ext.config import FlashComm2ConfigError, get_flashcomm2_config

    with pytest.raises(FlashComm2ConfigError, match="must be smaller than tensor_parallel_size=2"):
        get_flashcomm2_config(_vllm_config(2, {"enable_flashcomm2_parallel_size": 2}))
