"""Layer-level contracts inside a gloo worker (docs/ascend.md, contracts 2, 4,
6, 8, 9): our FlashComm2 o_proj with vllm-ascend's real linear methods,
against plain TP built from the same real classes.

Every function returns plain data for the parent to assert.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.ascend_real import layers as L
from vllm_ascend_ext.ops.side_counter import count_sides

SCHEMES = (None, "W8A8", "W8A8_DYNAMIC")
TOKENS = (1, 9)  # 9: not a multiple of 2 or 4, so FlashComm2 pads
ADAPTIVE_TOKENS = 4


def _name(scheme: str | None) -> str:
    return scheme or "unquantized"


def _max_abs(t: torch.Tensor) -> float:
    return float(t.float().abs().max())


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class _FlashComm2Groups:
    def __init__(self, k: int, oshared: bool = False):
        self.k, self.oshared = k, oshared

    def __enter__(self):
        from vllm_ascend_ext.config import FlashComm2Config
        from vllm_ascend_ext.distributed.parallel_state import init_flashcomm2_groups

        init_flashcomm2_groups(FlashComm2Config(parallel_size=self.k, oshared=self.oshared),
                               dp_lockstep=False)

    def __exit__(self, *exc):
        from tests.dist_utils import destroy_flashcomm2_groups_together

        destroy_flashcomm2_groups_together()


def _inputs(rank: int, P: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, L.A, generator=g) * 1.5).to(L.PARAMS_DTYPE)
    a = L.A // P
    return x, x[:, rank * a:(rank + 1) * a]


def methods_and_weights(rank: int, P: int, ks: tuple[int, ...]) -> dict:
    """Contract 6: which method each layer gets, and the weights that method
    creates and leaves after ``process_weights_after_loading``."""
    out: dict = {}
    for scheme in SCHEMES:
        ckpt = L.checkpoint(scheme, seed=1)
        plain = L.plain_tp(scheme)
        row = {"plain_class": type(plain).__name__, "plain": {"methods": L.method_names(plain),
                                                              "before": L.state_of(plain)}}
        L.load(plain, ckpt)
        L.post_process(plain)
        row["plain"]["after"] = L.state_of(plain)
        for k in ks:
            with _FlashComm2Groups(k):
                layer = L.flashcomm2(scheme)
                info = {"methods": L.method_names(layer), "before": L.state_of(layer)}
                L.load(layer, ckpt)
                L.post_process(layer)
                info["after"] = L.state_of(layer)
                info["input_columns"] = layer.input_size_per_partition
                row[f"k={k}"] = info
        out[_name(scheme)] = row
    return out


def flashcomm2_vs_plain_tp(rank: int, P: int, ks: tuple[int, ...]) -> dict:
    """Contracts 2 and 8: FlashComm2 (int8 all-to-all on and off) against
    plain TP and against the whole layer on one rank, all through vllm-ascend's
    real ``apply``; and what the real wrapper's rank read alone would give."""
    out: dict = {}
    for scheme in SCHEMES[1:]:
        ckpt = L.checkpoint(scheme, seed=2)
        plain, full = L.plain_tp(scheme), L.plain_tp(scheme, full=True)
        for layer in (plain, full):
            L.load(layer, ckpt)
            L.post_process(layer)
        for k in ks:
            with _FlashComm2Groups(k):
                for int8 in (True, False):
                    layer = L.flashcomm2(scheme, int8_all_to_all=int8, adaptive_tokens=0)
                    L.load(layer, ckpt)
                    L.post_process(layer)
                    for T in TOKENS:
                        x, x_local = _inputs(rank, P, T, seed=100 + T)
                        y, ref = layer(x_local)[0], plain(x_local)[0]
                        whole = L.reference(full, x)
                        out[f"{_name(scheme)} k={k} int8={int8} T={T}"] = {
                            "vs_plain": _gap(y, ref), "vs_whole": _gap(y, whole),
                            "plain_vs_whole": _gap(ref, whole), "scale": _max_abs(whole),
                            "float_vs_whole": _gap(x.float() @ ckpt.weight_dequant.t(), whole),
                            "route": getattr(layer.int8_input(), "route", None),
                        }
                if k == 1:
                    # vllm-ascend's wrapper, called as vLLM would: the global
                    # TP rank, so quant_bias on TP rank 0 only
                    from vllm_ascend_ext.ops.quant_terms import apply_linear

                    x, _ = _inputs(rank, P, 5, seed=7)
                    out[f"{_name(scheme)} wrapper's own rank"] = {
                        "gap": _gap(layer.quant_method.apply(layer, x),
                                    apply_linear(layer, x, None)),
                        "scale": _max_abs(apply_linear(layer, x, None))}
    return out


def adaptive_small_side(rank: int, P: int, ks: tuple[int, ...]) -> dict:
    """Contract 9: the switch's small side is plain TP's own o_proj (vLLM's
    ``RowParallelLinear``, which vllm-ascend builds as its
    ``AscendRowParallelLinear``), kept beside the FlashComm2 layer and loaded
    through its loaders, on the real W8A8-static scheme with an activation
    offset; against a separately built plain TP layer."""
    from vllm_ascend_ext.ops.resident_slice import attach_resident_slice

    out: dict = {}
    scheme = "W8A8"
    ckpt = L.checkpoint(scheme, seed=3)
    plain = L.plain_tp(scheme)
    L.load(plain, ckpt)
    L.post_process(plain)
    for k in ks:
        with _FlashComm2Groups(k):
            layer = L.flashcomm2(scheme, int8_all_to_all=True, adaptive_tokens=ADAPTIVE_TOKENS)
            kept = L.plain_tp(scheme)
            attach_resident_slice(layer, kept)  # as the model install does
            L.load(layer, ckpt)
            for module in layer.modules():  # vLLM's pass: the layer, then its slice
                L.post_process(module)
            counts = count_sides(layer)
            for T in (2, ADAPTIVE_TOKENS, 9):
                x, x_local = _inputs(rank, P, T, seed=200 + T)
                y, ref = layer(x_local)[0], plain(x_local)[0]
                out[f"k={k} T={T}"] = {"gap": _gap(y, ref), "scale": _max_abs(ref)}
            out[f"k={k} slice"] = f"{type(kept).__module__}.{type(kept).__qualname__}"
            out[f"k={k} calls"] = [counts.flashcomm2, counts.row_parallel]
    return out


def _slot_storages(series: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for buf in series.ring.slots.values() for t in buf.views}


def oshared_over_real_w8a8(rank: int, P: int, k: int, num_layers: int = 4) -> dict:
    """Contract 4 without NZ: o_shared over vllm-ascend's W8A8-static method.
    Each layer has its own input scale, so a slot or attribute that kept
    another layer's state would change the outputs."""
    from vllm_ascend_ext.distributed.parallel_state import get_flashcomm2_oshared_group
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    scheme = "W8A8"
    ckpts = [L.checkpoint(scheme, seed=10 + i, input_scale=0.04 + 0.01 * i)
             for i in range(num_layers)]
    out: dict = {}
    with _FlashComm2Groups(k, oshared=True):
        series = SharedWeightSeries(name=f"real-w8a8.k{k}", group=get_flashcomm2_oshared_group(),
                                    prefetch_step=1)
        shared, alone = [], []
        for i, ckpt in enumerate(ckpts):
            lay = L.flashcomm2(scheme, i, num_layers=num_layers, int8_all_to_all=True,
                               adaptive_tokens=0)
            series.add_layer(lay, i)
            shared.append(lay)
            ref = L.flashcomm2(scheme, i, num_layers=num_layers, int8_all_to_all=True,
                               adaptive_tokens=0)
            alone.append(ref)
            for layer in (lay, ref):
                L.load(layer, ckpt)
        for layer in shared + alone:
            L.post_process(layer)  # the first shared one finalises the series
        owner = [series.owner_of_layer_idx(i) == series.rank_in_group for i in range(num_layers)]
        slots = _slot_storages(series)
        out["layers"] = []
        for i, lay in enumerate(shared):
            state = L.state_of(lay)
            out["layers"].append({
                "owned": owner[i], "state": state, "alone_state": L.state_of(alone[i]),
                "params_in_slot": sorted(
                    n for n, p in lay.named_parameters(recurse=False)
                    if p.untyped_storage().data_ptr() in slots),
                "attributes_match_alone": all(
                    torch.equal(getattr(lay, n), getattr(alone[i], n))
                    for n, (kind, _, _) in state.items() if kind == "attribute"),
            })
        gaps = []
        for step in range(2):  # two forward passes: the ring wraps around
            for T in TOKENS:
                _, x_local = _inputs(rank, P, T, seed=300 + 10 * step + T)
                for lay, ref in zip(shared, alone):
                    gaps.append(_gap(lay(x_local)[0], ref(x_local)[0]))
        out["max_gap"] = max(gaps)
        report = series.memory_report()
        out["memory"] = {"owned": report.owned_layers, "slots": report.slots,
                         "per_layer": report.per_layer_bytes, "resident": report.resident_bytes}
        out["routes"] = sorted({str(getattr(lay.int8_input(), "route", None)) for lay in shared})
        series.close()
    return out


def tp_shard_over_real_methods(rank: int, P: int, k: int, num_layers: int = 4) -> dict:
    """o_shared's TP-shard storage over vllm-ascend's real classes: each layer
    keeps a real ``AscendRowParallelLinear`` (its plain TP shard, loaded and
    post-processed by the real W8A8 methods), FlashComm2's weight is gathered
    as the method's own ``tp_weight_gather_specs`` / ``tp_weight_repeat_specs``
    say, and the outputs must equal FlashComm2 without o_shared exactly.
    Small steps (at or below the threshold) run the shard itself, against
    plain TP."""
    from vllm_ascend_ext.distributed.parallel_state import get_flashcomm2_odp_group
    from vllm_ascend_ext.ops.tp_shard.specs import shard_specs_for
    from vllm_ascend_ext.ops.tp_shard.storage import TPShardStorage

    out: dict = {"declared_by": {}}
    # the unquantized method declares its gather too (its apply needs an NPU)
    out["declared_by"]["unquantized"] = shard_specs_for(L.plain_tp(None)).declared_by
    for scheme in SCHEMES[1:]:
        ckpts = [L.checkpoint(scheme, seed=40 + i, input_scale=0.04 + 0.01 * i)
                 for i in range(num_layers)]
        with _FlashComm2Groups(k, oshared=True):
            specs = shard_specs_for(L.plain_tp(scheme, num_layers=num_layers))
            out["declared_by"][scheme] = specs.declared_by
            storage = TPShardStorage(f"real-tp-shard.{scheme}.k{k}", get_flashcomm2_odp_group(),
                                     1, specs)
            shared, alone, plain = [], [], []
            for i, ckpt in enumerate(ckpts):
                lay = L.flashcomm2(scheme, i, num_layers=num_layers, int8_all_to_all=True,
                                   adaptive_tokens=ADAPTIVE_TOKENS)
                storage.add_layer(lay, L.plain_tp(scheme, i, num_layers=num_layers), i)
                ref = L.flashcomm2(scheme, i, num_layers=num_layers, int8_all_to_all=True,
                                   adaptive_tokens=0)
                tp = L.plain_tp(scheme, i, num_layers=num_layers)
                for layer in (lay, ref, tp):
                    L.load(layer, ckpt)
                shared.append(lay), alone.append(ref), plain.append(tp)
            for layer in shared + alone + plain:  # vLLM's pass: parent, then its slice
                for module in layer.modules():
                    L.post_process(module)
            counts = [count_sides(lay) for lay in shared]
            gaps, small_gaps, scale = [], [], 0.0
            for step in range(2):  # two passes: the ring wraps around
                for T in (2, 9):
                    _, x_local = _inputs(rank, P, T, seed=500 + 10 * step + T)
                    for lay, ref, tp in zip(shared, alone, plain):
                        y = lay(x_local)[0]
                        if T > ADAPTIVE_TOKENS:
                            gaps.append(_gap(y, ref(x_local)[0]))
                        else:
                            want = tp(x_local)[0]
                            small_gaps.append(_gap(y, want))
                            scale = max(scale, _max_abs(want))
            report = storage.memory_report()
            out[scheme] = {
                "max_gap": max(gaps), "small_max_gap": max(small_gaps), "scale": scale,
                "routes": sorted({str(getattr(lay.int8_input(), "route", None))
                                  for lay in shared}),
                "gathered": [s.attr for s in specs.gathered],
                "repeated": [s.attr for s in specs.repeated],
                "own_weight_numel": [lay.weight.numel() for lay in shared],
                "slot_weight_shape": list(storage.ring.slots[0]["weight"].shape),
                "memory": {"slots": report.slots, "group": report.group_size,
                           "gathered": report.gathered_bytes_per_layer,
                           "shard": report.shard_bytes},
                "calls": [[c.flashcomm2, c.row_parallel] for c in counts],
                "gathers": storage.num_gathers,
            }
            storage.close()
    return out
