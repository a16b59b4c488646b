"""o_shared shared-weight series on real gloo process groups (vLLM GroupCoordinator).

Heavy lifting happens in spawned worker worlds (tests/dist_utils.py); one world
per group size runs many cases, and the results are asserted here.
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.dist_utils import make_group_coordinator, run_distributed  # noqa: E402

from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError  # noqa: E402
from vllm_ascend_ext.ops.shared_weight.registry import shared_weight_registry  # noqa: E402
from vllm_ascend_ext.ops.shared_weight.ring_index import next_prefetch_position  # noqa: E402
from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries  # noqa: E402
from vllm_ascend_ext.ops.slot_storage import PACK_ALIGN  # noqa: E402

OUT, IN = 8, 16  # tiny o_proj: weight [OUT, IN] fp32 + bias [OUT]
SWEEP_L = (1, 2, 3, 5, 8)
SWEEP_K = (0, 1, 2)
SWEEP_START = (0, 7, 31)
PASSES = 4


# ----------------------------------------------------------------------------
# pure index arithmetic
# ----------------------------------------------------------------------------


def _upstream_next_layer(layer_idx: int, step: int, num_layers: int, start: int) -> int:
    """The seed module's formula, kept only to show where it goes wrong."""
    return (layer_idx + step) % num_layers + start


def test_next_position_beats_upstream_formula_for_later_stage():
    start, L, k = 7, 5, 1  # series = layers 7..11 (e.g. the second PP stage)
    upstream = [_upstream_next_layer(i, k, L, start) for i in range(start, start + L)]
    ours = [start + next_prefetch_position(p, k, L) for p in range(L)]
    # After layer 7 the layer that runs next (and reuses its slot) is 8.
    assert ours == [8, 9, 10, 11, 7]
    # Upstream fetches layer 10 after layer 7: the wrong layer; layer 8 then
    # waits for weights nobody sent (the hang seen with start=7).
    assert upstream == [10, 11, 7, 8, 9]
    assert all(u != o for u, o in zip(upstream, ours))
    # The formula only works when start is a multiple of L (e.g. the first stage).
    for ok_start in (0, 10):
        assert [_upstream_next_layer(i, k, L, ok_start) - ok_start
                for i in range(ok_start, ok_start + L)] == \
            [next_prefetch_position(p, k, L) for p in range(L)]
    # k = 2, start = 31, L = 5: upstream also leaves the slot's residue class.
    up2 = [_upstream_next_layer(i, 2, 5, 31) - 31 for i in range(31, 36)]
    assert up2 == [3, 4, 0, 1, 2]
    assert [next_prefetch_position(p, 2, 5) for p in range(5)] == [2, 3, 4, 1, 0]


def test_next_position_explicit_sequences():
    # L % k != 0: wrap to the slot's first user, never into another slot.
    assert [next_prefetch_position(p, 2, 5) for p in range(5)] == [2, 3, 4, 1, 0]
    assert [next_prefetch_position(p, 3, 8) for p in range(8)] == [3, 4, 5, 6, 7, 2, 0, 1]
    assert [next_prefetch_position(p, 2, 3) for p in range(3)] == [2, 1, 0]
    assert [next_prefetch_position(p, 0, 4) for p in range(4)] == [None] * 4
    for L in range(1, 12):
        for k in range(1, L):
            for p in range(L):
                q = next_prefetch_position(p, k, L)
                assert q % k == p % k  # same slot
                assert q == (p + k if p + k < L else p % k)
    with pytest.raises(SharedWeightError):
        next_prefetch_position(5, 1, 5)


def test_negative_prefetch_step_rejected():
    group = SimpleNamespace(world_size=2, rank_in_group=0, ranks=[0, 1], device_group=None)
    with pytest.raises(SharedWeightError, match="prefetch_step"):
        SharedWeightSeries("neg-step", group, -1)
    assert "neg-step" not in shared_weight_registry


# ----------------------------------------------------------------------------
# helpers that run inside the workers
# ----------------------------------------------------------------------------


def _ref_weight(layer_idx: int, out: int = OUT, inp: int = IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + layer_idx)
    return torch.randn(out, inp, generator=g) / 4 + 0.01 * layer_idx


def _ref_bias(layer_idx: int, out: int = OUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(20_000 + layer_idx)
    return torch.randn(out, generator=g) + layer_idx


def _input(position: int, rows: int = 3, inp: int = IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(30_000 + position)
    return torch.randn(rows, inp, generator=g)


def _make_linear(layer_idx, out=OUT, inp=IN, cls=None, dtype=torch.float32,
                 quant_config=None, bias=True):
    from vllm.model_executor.layers.linear import ReplicatedLinear

    cls = cls or ReplicatedLinear
    kwargs = dict(bias=bias, params_dtype=dtype, quant_config=quant_config,
                  prefix=f"model.layers.{layer_idx}.self_attn.o_proj")
    if cls is not ReplicatedLinear:
        kwargs["disable_tp"] = True
    return cls(inp, out, **kwargs)


def _load(layers, out=OUT, inp=IN):
    """What a model loader does: call every parameter's weight_loader on every rank."""
    for layer in layers:
        idx = int(layer.prefix.split(".")[2])
        layer.weight.weight_loader(layer.weight, _ref_weight(idx, out, inp))
        if getattr(layer, "bias", None) is not None:
            layer.bias.weight_loader(layer.bias, _ref_bias(idx, out))


def _post_load(layers):
    """vLLM's real post-load pass over a container module."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    model = torch.nn.ModuleList(layers)
    cfg = SimpleNamespace(word_embeddings_untied_by_checkpoint=False,
                          quantization=None, dtype=torch.float32)
    process_weights_after_loading(model, cfg, torch.device("cpu"))


def _storage_bytes(layers) -> tuple[int, int]:
    """(distinct storages, their total bytes) behind the layers' params/buffers."""
    seen = {}
    for layer in layers:
        for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
            st = t.untyped_storage()
            if st.nbytes():
                seen[st.data_ptr()] = st.nbytes()
    return len(seen), sum(seen.values())


def _round(x: int) -> int:
    return (x + PACK_ALIGN - 1) // PACK_ALIGN * PACK_ALIGN


def _run_sweep_case(rank, n, L, k, start, group):
    """One series; returns a list of failure strings (empty = pass)."""
    fails = []
    name = f"sweep-n{n}-L{L}-k{k}-s{start}"
    indices = list(range(start, start + L))
    layers = [_make_linear(i) for i in reversed(indices)]  # register out of order
    series = SharedWeightSeries(name, group, k)
    for layer in layers:
        series.add_layer(layer)
    layers = sorted(layers, key=lambda m: int(m.prefix.split(".")[2]))

    owned = [p for p in range(L) if (start + p) % n == rank]
    non_owned = [p for p in range(L) if p not in owned]
    if len(owned) not in (L // n, -(-L // n)):
        fails.append(f"{name}: unbalanced ownership {owned}")
    for p in non_owned:
        w, b = layers[p].weight, layers[p].bias
        if w.untyped_storage().nbytes() or b.untyped_storage().nbytes():
            fails.append(f"{name}: non-owned position {p} holds storage before load")

    _load(layers)
    for p in non_owned:
        if layers[p].weight.untyped_storage().nbytes():
            fails.append(f"{name}: loader filled non-owned position {p}")
    _post_load(layers)
    if not series.finalized:
        fails.append(f"{name}: post-load pass did not finalise the series")

    # memory: expected computed independently of the implementation
    if k == 0:
        slots = {0} if non_owned else set()
    else:
        slots = {p % k for p in non_owned}
    per_layer = _round(OUT * IN * 4) + _round(OUT * 4)
    expected = (len(owned) + len(slots)) * per_layer
    rep = series.memory_report()
    got = (rep.per_layer_bytes, rep.owned_layers, rep.slots, rep.resident_bytes,
           rep.replicated_bytes, rep.floor_bytes)
    want = (per_layer, len(owned), len(slots), expected, L * per_layer, L * per_layer / n)
    if got != want:
        fails.append(f"{name}: memory report {got} != {want}")
    n_storages, storage_bytes = _storage_bytes(layers)
    if (n_storages, storage_bytes) != (len(owned) + len(slots), expected):
        fails.append(f"{name}: measured storages {n_storages}/{storage_bytes} B, "
                     f"expected {len(owned) + len(slots)}/{expected} B")

    ids = [(id(m.weight), id(m.bias), m.weight.data_ptr()) for m in layers]
    seen = []
    for layer in layers:
        orig_apply = layer.quant_method.apply

        def apply(lyr, x, bias=None, _orig=orig_apply):
            idx = int(lyr.prefix.split(".")[2])
            seen.append((lyr.shared_weight_position,
                         torch.equal(lyr.weight, _ref_weight(idx)),
                         torch.equal(lyr.bias, _ref_bias(idx))))
            return _orig(lyr, x, bias)

        layer.quant_method.apply = apply

    from torch.nn.functional import linear

    for it in range(PASSES):
        for p, layer in enumerate(layers):
            x = _input(p)
            y, _ = layer(x)
            ref = linear(x, _ref_weight(start + p), _ref_bias(start + p))
            if not torch.equal(y, ref):
                fails.append(f"{name}: pass {it} position {p} output differs "
                             f"(max {float((y - ref).abs().max()):.3g})")
    want_seen = [(p, True, True) for _ in range(PASSES) for p in range(L)]
    if seen != want_seen:
        bad = [s for s in seen if not (s[1] and s[2])]
        fails.append(f"{name}: weights at use time wrong: {bad[:4]}")
    if ids != [(id(m.weight), id(m.bias), m.weight.data_ptr()) for m in layers]:
        fails.append(f"{name}: parameter identity or storage changed")
    series.close()
    if name in shared_weight_registry:
        fails.append(f"{name}: still registered after close()")
    return fails


def _sweep_group(group, cases):
    fails, t0 = [], time.perf_counter()
    for L, k, start in cases:
        try:
            fails += _run_sweep_case(group.rank_in_group, group.world_size, L, k,
                                     start, group)
        except Exception as e:  # noqa: BLE001 - reported per case
            fails.append(f"n={group.world_size} L={L} k={k} start={start}: "
                         f"{type(e).__name__}: {e}")
            raise
    return {"n": group.world_size, "ranks": list(group.ranks), "cases": len(cases),
            "fails": fails, "seconds": time.perf_counter() - t0}


def _sweep_worker(rank, world_size, cases):
    """One 4-process world runs every group size: two concurrent pairs (n=2),
    a triple plus a singleton (n=3 and n=1), then the whole world (n=4)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import get_tp_group

    assert world_size == 4
    out = []
    with set_current_vllm_config(VllmConfig()):
        for ranks, name in (([[0, 1], [2, 3]], "sweep_pairs"),
                            ([[0, 1, 2], [3]], "sweep_triple")):
            group = make_group_coordinator(ranks, name)
            try:
                out.append(_sweep_group(group, cases))
            finally:
                group.destroy()
        out.append(_sweep_group(get_tp_group(), cases))
    return out


def _sweep_cases():
    return [(L, k, s) for L in SWEEP_L for k in SWEEP_K if k <= L - 1
            for s in SWEEP_START]


@pytest.fixture(scope="module")
def sweeps():
    return run_distributed(_sweep_worker, 4, _sweep_cases(), timeout=600)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sweep_round_robin_ring(sweeps, n):
    runs = [res for per_rank in sweeps for res in per_rank if res["n"] == n]
    assert len(runs) == {1: 1, 2: 4, 3: 3, 4: 4}[n]  # ranks that ran this size
    for res in runs:
        assert res["cases"] == len(_sweep_cases()) == 36
        assert res["fails"] == [], f"ranks {res['ranks']}: " + "\n".join(res["fails"][:20])


# ----------------------------------------------------------------------------
# two-rank world: quant methods, CPU path, compile, errors
# ----------------------------------------------------------------------------


def _transposed_int8_method_cls():
    from torch.nn import Parameter
    from vllm.model_executor.layers.linear import LinearMethodBase
    from vllm.model_executor.parameter import ModelWeightParameter

    class TransposedInt8Method(LinearMethodBase):
        """Post-load: int8 weight as a NEW Parameter holding a transposed
        (non-contiguous) view, plus an fp32 per-row scale buffer."""

        def create_weights(self, layer, input_size_per_partition,
                           output_partition_sizes, input_size, output_size,
                           params_dtype, **extra):
            weight = ModelWeightParameter(
                data=torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                 dtype=params_dtype),
                input_dim=1, output_dim=0, weight_loader=extra["weight_loader"])
            layer.register_parameter("weight", weight)

        def process_weights_after_loading(self, layer):
            w = layer.weight.data
            scale = w.abs().amax(dim=1) / 127
            q = torch.round(w / scale[:, None]).to(torch.int8)
            layer.weight = Parameter(q.t(), requires_grad=False)  # [IN, OUT], stride (1, IN)
            layer.register_buffer("weight_scale", scale.to(torch.float32))

        def apply(self, layer, x, bias=None):
            y = (x @ layer.weight.to(x.dtype)) * layer.weight_scale
            return y if bias is None else y + bias

    return TransposedInt8Method


def _transposed_int8_reference(layer_idx, x):
    w = _ref_weight(layer_idx)
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8).t()
    return q, scale, (x @ q.to(x.dtype)) * scale


def _case_custom_quant(rank, group):
    from vllm.model_executor.layers.linear import RowParallelLinear

    method_cls = _transposed_int8_method_cls()
    start, L, k = 7, 5, 2
    layers = []
    for i in range(start, start + L):
        layer = _make_linear(i, cls=RowParallelLinear, bias=False)
        # swap in the custom method before weights exist (as a quant config would)
        del layer.weight
        layer.quant_method = method_cls()
        layer.quant_method.create_weights(layer, IN, [OUT], IN, OUT, torch.float32,
                                          weight_loader=layer.weight_loader)
        layers.append(layer)
    series = SharedWeightSeries("custom-quant", group, k)
    for layer in layers:
        series.add_layer(layer)
    _load(layers)
    _post_load(layers)
    out = {"layouts": [(lay.name, lay.kind, str(lay.dtype), lay.shape, lay.stride)
                       for lay in series.layouts]}
    seen = []
    for layer in layers:  # observe the parameter views at use time

        def apply(lyr, x, bias=None, _orig=layer.quant_method.apply):
            q, scale, _ = _transposed_int8_reference(int(lyr.prefix.split(".")[2]), x)
            seen.append(torch.equal(lyr.weight, q) and lyr.weight.stride() == q.stride()
                        and torch.equal(lyr.weight_scale, scale))
            return _orig(lyr, x, bias)

        layer.quant_method.apply = apply
    ok = True
    for _ in range(3):
        for p, layer in enumerate(layers):
            x = _input(p)
            y = layer(x)[0]
            ok &= torch.equal(y, _transposed_int8_reference(start + p, x)[2])
    out["exact"] = bool(ok) and len(seen) == 3 * L and all(seen)
    out["report"] = series.memory_report()
    series.close()
    return out


class _NpuFormatStandIn:
    """torch_npu's format bookkeeping, played on CPU (a collaborator stand-in):
    a tensor's format belongs to its storage, and an NZ (29) storage is padded
    to 16 x 16 blocks, so its real size exceeds the logical elements."""

    NZ, ND = 29, 2

    def __init__(self):
        self._nz_storages = []  # kept alive, so no address is reused

    def format_cast_nz(self, t):
        """What ``torch_npu.npu_format_cast(t, 29)`` returns: same values, NZ storage."""
        rows, cols = t.shape
        padded = torch.zeros(-(-rows // 16) * 16 * (-(-cols // 16) * 16), dtype=t.dtype)
        out = padded[: rows * cols].view(rows, cols)
        out.copy_(t)
        self._nz_storages.append(padded.untyped_storage())
        return out

    def get_npu_format(self, t):
        ptr = t.untyped_storage().data_ptr()
        return self.NZ if any(s.data_ptr() == ptr for s in self._nz_storages) else self.ND

    def empty_like(self, t):
        """``torch.empty_like`` on NPU keeps a non-base format (empty_like_npu)."""
        out = torch.empty_like(t)
        return self.format_cast_nz(out) if self.get_npu_format(t) == self.NZ else out


def _nz_int8_method_cls(formats):
    from torch.nn import Parameter

    base = _transposed_int8_method_cls()

    class NzInt8Method(base):
        """Post-load like vllm-ascend's W8A8: int8 weight cast to NZ, scale plain."""

        def process_weights_after_loading(self, layer):
            w = layer.weight.data
            scale = w.abs().amax(dim=1) / 127
            q = torch.round(w / scale[:, None]).to(torch.int8)
            layer.weight = Parameter(formats.format_cast_nz(q), requires_grad=False)
            layer.register_buffer("weight_scale", scale.to(torch.float32))

        def apply(self, layer, x, bias=None):
            y = (x @ layer.weight.to(x.dtype).t()) * layer.weight_scale
            return y if bias is None else y + bias

    return NzInt8Method


def _case_storage_format(rank, group):
    """Contract 4: a processed NZ weight in a ring slot keeps its format and
    its real (padded) storage size with the Ascend slot format; today's byte
    views (the CPU/CUDA format) would hold it as ND."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.ops.slot_storage import NpuStorageFormat, PackedBytes

    out = {}
    for fmt_name in ("npu-storage-format", "packed-bytes"):
        formats = _NpuFormatStandIn()
        slot_format = (NpuStorageFormat(npu_format=formats.get_npu_format,
                                        empty_like=formats.empty_like)
                       if fmt_name == "npu-storage-format" else PackedBytes())
        start, L, k = 3, 5, 2
        layers = []
        for i in range(start, start + L):
            layer = _make_linear(i, cls=RowParallelLinear, bias=False)
            del layer.weight
            layer.quant_method = _nz_int8_method_cls(formats)()
            layer.quant_method.create_weights(layer, IN, [OUT], IN, OUT, torch.float32,
                                              weight_loader=layer.weight_loader)
            layers.append(layer)
        series = SharedWeightSeries(f"nz-{fmt_name}", group, k, slot_format=slot_format)
        for layer in layers:
            series.add_layer(layer)
        _load(layers)
        _post_load(layers)
        formats_at_use, exact = [], True
        for _ in range(3):
            for p, layer in enumerate(layers):
                x = _input(p)
                series.wait(p, x)
                formats_at_use.append(formats.get_npu_format(layer.weight))
                q, scale, _ = _transposed_int8_reference(start + p, x)
                exact &= torch.equal(layer.weight, q.t()) and torch.equal(
                    layer.weight_scale, scale)
                y = layer.quant_method.apply(layer, x)
                series.prefetch_after(p, y)
                exact &= torch.equal(y, _transposed_int8_reference(start + p, x)[2])
        rep = series.memory_report()
        out[fmt_name] = {
            "exact": bool(exact), "formats_at_use": sorted(set(formats_at_use)),
            "layouts": [(lay.name, lay.storage_format, lay.span_bytes)
                        for lay in series.layouts],
            "per_layer_bytes": rep.per_layer_bytes, "resident_bytes": rep.resident_bytes,
            "owned": rep.owned_layers, "slots": rep.slots,
            "measured": _storage_bytes(layers)[1],
        }
        series.close()
    return out


def _case_cpu_unquantized(rank, group):
    import torch.nn.functional as F
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_ascend_ext.compat import FIRST_VLLM_WITH_CPU_SKIP_GEMM_DISPATCH, vllm_release

    layers = [_make_linear(i) for i in range(0, 3)]
    series = SharedWeightSeries("cpu-unquantized", group, 1)
    for layer in layers:
        series.add_layer(layer)
    _load(layers)
    _post_load(layers)
    out = {
        "method": [type(m.quant_method).__name__ for m in layers],
        "is_unquantized": all(isinstance(m.quant_method, UnquantizedLinearMethod)
                              for m in layers),
        # vLLM >= 0.32 honours the flag; older releases get compat's post-load.
        "skip_flag": all(getattr(m, "_cpu_skip_gemm_dispatch", False) for m in layers)
        == (vllm_release() >= FIRST_VLLM_WITH_CPU_SKIP_GEMM_DISPATCH),
        "cpu_linear_is_F_linear": all(m.cpu_linear is F.linear for m in layers),
        "weight_shapes": [tuple(m.weight.shape) for m in layers],
    }
    ok = True
    for _ in range(3):
        for p, layer in enumerate(layers):
            x = _input(p)
            ok &= torch.equal(layer(x)[0], F.linear(x, _ref_weight(p), _ref_bias(p)))
    out["exact"] = bool(ok)
    series.close()
    return out


def _case_module_functions(rank, group):
    """The upstream-named module functions on a later-stage series (start=31)."""
    import torch.nn.functional as F
    from vllm_ascend_ext.ops.shared_weight.upstream_api import (
        is_hidden_layer,
        post_process_after_loading_for_shared_weight_series,
        reach_layer_for_shared_weight_series,
        register_layer_to_shared_weight_series,
    )

    layers = [_make_linear(i) for i in range(31, 34)]
    for layer in layers:
        series = register_layer_to_shared_weight_series("o_proj-fn", group, layer, 1)
    _load(layers)
    post_process_after_loading_for_shared_weight_series(layers[1])  # finalises all
    _post_load(layers)  # vLLM's pass afterwards: no-ops for members
    ok = series.finalized and series.start_layer == 31
    for _ in range(3):
        for p, layer in enumerate(layers):
            reach_layer_for_shared_weight_series(layer)  # documented no-op
            x = _input(p)
            ok &= torch.equal(layer(x)[0],
                              F.linear(x, _ref_weight(31 + p), _ref_bias(31 + p)))
    cfg = SimpleNamespace(model_config=SimpleNamespace(
        hf_text_config=SimpleNamespace(num_hidden_layers=33)))
    hidden = [is_hidden_layer(cfg, m) for m in layers]
    series.close()
    return {"exact": bool(ok), "hidden": hidden,
            "owners": [series.owner_of_layer_idx(i) for i in range(31, 34)]}


def _case_skip_bias_add(rank, group):
    """A returned bias must survive the prefetch that refills its slot."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    layers = [ReplicatedLinear(IN, OUT, bias=True, skip_bias_add=True,
                               params_dtype=torch.float32,
                               prefix=f"model.layers.{i}.self_attn.o_proj")
              for i in range(3)]
    series = SharedWeightSeries("skip-bias", group, 1)
    for layer in layers:
        series.add_layer(layer)
    _load(layers)
    _post_load(layers)
    ok = True
    for _ in range(3):
        returned = [layer(_input(p))[1] for p, layer in enumerate(layers)]
        series.synchronize()  # every refill has landed
        ok &= all(torch.equal(b, _ref_bias(p)) for p, b in enumerate(returned))
    series.close()
    return bool(ok)


class _Chain(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x)[0])
        return x


def _case_compile(rank, group, backend):
    import torch.nn.functional as F

    start, L, k, D = 3, 4, 1, 16
    layers = [_make_linear(i, out=D, inp=D) for i in range(start, start + L)]
    series = SharedWeightSeries(f"compile-{backend}", group, k)
    for layer in layers:
        series.add_layer(layer)
    _load(layers, out=D, inp=D)
    _post_load(layers)
    model = _Chain(layers)

    def reference(x):
        for i in range(start, start + L):
            x = torch.tanh(F.linear(x, _ref_weight(i, D, D), _ref_bias(i, D)))
        return x

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = {"eager_exact": True, "compiled_close": True, "max_err": 0.0, "op_counts": []}
    t0 = time.perf_counter()
    for call in range(4):
        x = _input(call, rows=5, inp=D)
        ref = reference(x)
        y_eager = model(x)
        before = (series.num_waits, series.num_prefetches, series.num_broadcasts)
        y_comp = compiled(x)
        after = (series.num_waits, series.num_prefetches, series.num_broadcasts)
        out["op_counts"].append(tuple(a - b for a, b in zip(after, before)))
        out["eager_exact"] &= torch.equal(y_eager, ref)
        err = float((y_comp - ref).abs().max())
        out["max_err"] = max(out["max_err"], err)
        out["compiled_close"] &= bool(torch.allclose(y_comp, ref, rtol=1e-5, atol=1e-6))
        if backend == "aot_eager":
            out["compiled_close"] &= torch.equal(y_comp, ref)
    out["seconds"] = time.perf_counter() - t0
    out["unique_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    series.close()
    return out


def _expect_error(fn):
    try:
        fn()
    except SharedWeightError as e:
        return ("SharedWeightError", str(e))
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, str(e))
    return ("no error", "")


def _error_cases(rank, group):
    res = {}

    def shape_mismatch():
        s = SharedWeightSeries("err-shape", group, 1)
        try:
            s.add_layer(_make_linear(0))
            s.add_layer(_make_linear(1, out=OUT * 2))
        finally:
            s.close()

    def dtype_mismatch():
        s = SharedWeightSeries("err-dtype", group, 1)
        try:
            s.add_layer(_make_linear(0))
            s.add_layer(_make_linear(1, dtype=torch.bfloat16))
        finally:
            s.close()

    def non_consecutive():
        layers = [_make_linear(i) for i in (3, 4, 6)]
        s = SharedWeightSeries("err-gap", group, 1)
        try:
            for m in layers:
                s.add_layer(m)
            _load(layers)
            _post_load(layers)  # raised from vLLM's pass, identically on all ranks
        finally:
            s.close()

    def duplicate_layer():
        s = SharedWeightSeries("err-dup", group, 1)
        try:
            m = _make_linear(0)
            s.add_layer(m)
            s.add_layer(m)
        finally:
            s.close()

    def duplicate_index():
        s = SharedWeightSeries("err-dup-idx", group, 1)
        try:
            s.add_layer(_make_linear(2))
            s.add_layer(_make_linear(2))
        finally:
            s.close()

    def duplicate_name():
        s = SharedWeightSeries("err-dup-name", group, 1)
        try:
            SharedWeightSeries("err-dup-name", group, 1)
        finally:
            s.close()

    def step_out_of_range():
        layers = [_make_linear(i) for i in range(3)]
        s = SharedWeightSeries("err-step", group, 3)
        try:
            for m in layers:
                s.add_layer(m)
            _load(layers)
            _post_load(layers)
        finally:
            s.close()

    def register_after_finalise():
        layers = [_make_linear(i) for i in range(2)]
        s = SharedWeightSeries("err-late", group, 1)
        try:
            for m in layers:
                s.add_layer(m)
            _load(layers)
            _post_load(layers)
            s.add_layer(_make_linear(2))
        finally:
            s.close()

    def forward_before_finalise():
        layers = [_make_linear(i) for i in range(2)]
        s = SharedWeightSeries("err-early", group, 1)
        try:
            for m in layers:
                s.add_layer(m)
            layers[0](_input(0))
        finally:
            s.close()

    def op_before_finalise():
        layers = [_make_linear(i) for i in range(2)]
        s = SharedWeightSeries("err-early-op", group, 1)
        try:
            for m in layers:
                s.add_layer(m)
            torch.ops.vllm_ascend_ext.shared_weight_wait(_input(0), "err-early-op", 0)
        finally:
            s.close()

    def wait_finds_other_layer():
        layers = [_make_linear(i) for i in range(7, 10)]
        s = SharedWeightSeries("err-order", group, 1)
        try:
            for m in layers:
                s.add_layer(m)
            _load(layers)
            _post_load(layers)
            layers[1](_input(1))  # slot 0 holds position 0
        finally:
            s.close()

    def unbroadcastable_representation():
        layers = [_make_linear(i) for i in range(2)]
        s = SharedWeightSeries("err-onednn", group, 1)
        import vllm_ascend_ext.compat as compat

        keep = compat.keep_cpu_linear_weight_plain
        # Let vLLM pack a oneDNN handle, as any opaque quant method would.
        compat.keep_cpu_linear_weight_plain = lambda layer, post_load: post_load
        try:
            for m in layers:
                s.add_layer(m)
                m._cpu_skip_gemm_dispatch = False
            _load(layers)
            _post_load(layers)
        finally:
            compat.keep_cpu_linear_weight_plain = keep
            s.close()

    for fn in (shape_mismatch, dtype_mismatch, non_consecutive, duplicate_layer,
               duplicate_index, duplicate_name, step_out_of_range,
               register_after_finalise, forward_before_finalise, op_before_finalise,
               wait_finds_other_layer, unbroadcastable_representation):
        res[fn.__name__] = _expect_error(fn)
    res["registry_left"] = shared_weight_registry.names()
    return res


def _two_rank_worker(rank, n):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import get_tp_group

    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    out = {}
    with set_current_vllm_config(VllmConfig()):
        group = get_tp_group()
        out["custom_quant"] = _case_custom_quant(rank, group)
        out["storage_format"] = _case_storage_format(rank, group)
        out["cpu_unquantized"] = _case_cpu_unquantized(rank, group)
        out["module_functions"] = _case_module_functions(rank, group)
        out["skip_bias_add"] = _case_skip_bias_add(rank, group)
        out["errors"] = _error_cases(rank, group)
        for backend in ("inductor",):
            out[f"compile_{backend}"] = _case_compile(rank, group, backend)
    return out


@pytest.fixture(scope="module")
def two_rank():
    return run_distributed(_two_rank_worker, 2, timeout=600)


def test_custom_quant_method_transposed_new_parameter(two_rank):
    for res in two_rank:
        assert res["custom_quant"]["exact"]
        assert res["custom_quant"]["layouts"] == [
            ("weight", "param", "torch.int8", (IN, OUT), (1, IN)),
            ("weight_scale", "buffer", "torch.float32", (OUT,), (1,)),
        ]
    # positions 7..11 over 2 ranks: rank 1 owns 7, 9, 11; rank 0 owns 8, 10
    assert [r["custom_quant"]["report"].owned_layers for r in two_rank] == [2, 3]


def test_ring_slots_keep_the_npu_storage_format(two_rank):
    """docs/ascend.md contract 4: the Ascend slot format holds the NZ weight
    in NZ at its padded size (int8 [8, 16] -> 16 x 16 = 256 bytes), the scale
    as it is; the byte-view format would hand the matmul an ND tensor."""
    for res in two_rank:
        npu, packed = res["storage_format"]["npu-storage-format"], res["storage_format"]["packed-bytes"]
        assert npu["exact"] and packed["exact"]  # same values either way ...
        assert npu["formats_at_use"] == [29]  # ... but only this keeps the format
        assert packed["formats_at_use"] == [2]
        assert npu["layouts"] == [("weight", 29, 256), ("weight_scale", 2, OUT * 4)]
        assert npu["per_layer_bytes"] == 256 + OUT * 4
        assert npu["resident_bytes"] == (npu["owned"] + npu["slots"]) * npu["per_layer_bytes"]
        assert npu["measured"] == npu["resident_bytes"]  # real storage, read back
        # logical strides only: the NZ padding is missed
        assert packed["layouts"][0][2] == OUT * IN


def test_cpu_unquantized_path(two_rank):
    for res in two_rank:
        cpu = res["cpu_unquantized"]
        assert cpu["is_unquantized"] and cpu["skip_flag"] and cpu["cpu_linear_is_F_linear"]
        assert cpu["weight_shapes"] == [(OUT, IN)] * 3
        assert cpu["exact"]


def test_upstream_named_module_functions(two_rank):
    for res in two_rank:
        fn = res["module_functions"]
        assert fn["exact"]
        assert fn["hidden"] == [True, True, False]  # index 33 is an MTP layer
        assert fn["owners"] == [1, 0, 1]  # owner = layer_idx % n


def test_returned_bias_survives_the_refill(two_rank):
    assert all(res["skip_bias_add"] for res in two_rank)


def test_torch_compile_fullgraph(two_rank):
    for res in two_rank:
        c = res["compile_inductor"]
        assert c["eager_exact"], c
        assert c["compiled_close"], c
        assert c["graph_breaks"] == 0 and c["unique_graphs"] == 1, c
        # every compiled call really ran the hooks: L waits, L prefetches, and
        # (k=1, L=4) one broadcast after each layer
        assert c["op_counts"] == [(4, 4, 4)] * 4, c


_ERRORS = {
    "shape_mismatch": "identical parameters",
    "dtype_mismatch": "identical parameters",
    "non_consecutive": "consecutive",
    "duplicate_layer": "already registered",
    "duplicate_index": "already has a layer with index 2",
    "duplicate_name": "already registered; series names must be unique",
    "step_out_of_range": r"prefetch_step must be in [0, 2]",
    "register_after_finalise": "already finalised",
    "forward_before_finalise": "not finalised",
    "op_before_finalise": "not finalised",
    "wait_finds_other_layer": "slot 0 holds the weights of position 0",
    "unbroadcastable_representation": "UnquantizedLinearMethod",
}


@pytest.mark.parametrize("case", sorted(_ERRORS))
def test_errors(two_rank, case):
    for res in two_rank:
        kind, msg = res["errors"][case]
        assert kind == "SharedWeightError", (case, kind, msg)
        assert _ERRORS[case] in msg, (case, msg)
        if case in ("shape_mismatch", "dtype_mismatch", "duplicate_layer"):
            assert "model.layers." in msg  # names the layer prefix
        assert res["errors"]["registry_left"] == []
