"""FlashComm2 o_proj on real multi-process gloo worlds.

Three 4-rank worlds, each spawned once (every case loops inside the workers):

* TP4 (vLLM ``initialize_model_parallel(4)``): P=4, k in {1, 2};
* DP2 x TP2 (vLLM's own DP layout: ``ParallelConfig(data_parallel_size=2)``
  in force while ``initialize_model_parallel(2)`` runs): P=2, k=1; the two
  replicas run *different* call sequences, which would hang if any FlashComm2
  or o_shared group spanned replicas (dense DP); then, as MoE DP does, both
  replicas step in lockstep (one with 1-token dummy batches) through one
  o_shared series spanning all 4 ranks;
* PP2 x TP2 (``initialize_model_parallel(2, 2)``): P=2, k=1, the second stage's
  o_shared series starts at layer 3 (not a multiple of the group size).

Every output is compared with an fp64 reference ``X @ W.T + b`` computed on
every rank from a shared seed (and, for fp32, with vLLM's own
``RowParallelLinear`` + all-reduce on the same shards).

Bounds: fp32 -- max |y - ref| <= 1e-5 * max |ref|.  bf16 -- elementwise
|y - ref| <= 2**-7 * S with S = |X| @ |W|.T + |b| (fp64): the inputs and weights
are exactly bf16 in both, the GEMM accumulates in fp32 (error ~ a * 2**-24 * S,
negligible), each of the k partial outputs is rounded to bf16 (<= 2**-9 of its
magnitude, <= 2**-9 * S together), the reduce-scatter sum and the bias add
round once more each (<= 2 * 2**-9 * S); total <= 3 * 2**-9 * S < 2**-7 * S.
Every collective output is NaN-poisoned before it is written
(``set_poison_outputs``) and inputs are strided views into NaN-filled buffers,
so a row the op fails to write, or reads past its view, shows up as NaN.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from tests.dist_utils import run_distributed
from vllm_ascend_ext.ops.flashcomm2_oproj import FlashComm2RowParallelLinear
from vllm_ascend_ext.ops.flashcomm2_plan import flashcomm2_plan, permute_blocks_for_all_to_all

A = 128  # o_proj input features (heads x v_head_dim)
H = 96  # hidden size
LAYERS = 3
T_VALUES = (1, 2, 3, 7, 64)
DTYPES = (torch.float32, torch.bfloat16)
FP32_REL = 1e-5
BF16_FACTOR = 2.0**-7
WORLD_TIMEOUT = 200.0


# --------------------------------------------------------------------------
# single-process checks (stub groups: the constructor checks sizes and ranks
# before it creates weights, which needs vLLM's TP state; the weight loader is
# checked inside the worlds below)
# --------------------------------------------------------------------------


def _stub(world_size, rank, name):
    return SimpleNamespace(world_size=world_size, rank_in_group=rank, unique_name=name)


def _stub_groups(P, k, tp_rank):
    D = P // k
    j, i = divmod(tp_rank, D)
    return dict(tp_group=_stub(P, tp_rank, "tp:x"), otp_group=_stub(k, j, "otp:x"),
                odp_group=_stub(D, i, "odp:x"))


@pytest.mark.parametrize("P,k", [(2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4)])
def test_block_permutation_matches_plan(P, k):
    for T in (1, 5, 3 * P):
        plan = flashcomm2_plan(T, P, k)
        assert plan.padded_tokens % P == 0 and 0 <= plan.pad_rows < P
        ids = torch.arange(plan.padded_tokens).view(-1, 1) // plan.block_rows  # block id
        sent = permute_blocks_for_all_to_all(ids, P, k).view(-1)
        for i in range(plan.odp_size):
            chunk = sent[i * plan.chunk_rows:(i + 1) * plan.chunk_rows]
            blocks = chunk.view(k, plan.block_rows)[:, 0].tolist()
            assert blocks == plan.chunk_blocks(i)
            assert (chunk.view(k, plan.block_rows) == chunk.view(k, -1)[:, :1]).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(input_is_parallel=False), "input_is_parallel=False"),
     (dict(reduce_results=False), "reduce_results=False"),
     (dict(disable_tp=True), "disable_tp=True")],
)
def test_constructor_rejects_unsupported_modes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlashComm2RowParallelLinear(A, H, **kwargs, **_stub_groups(4, 2, 0))


def test_constructor_rejects_bad_groups():
    g = _stub_groups(4, 2, 1)
    g["odp_group"] = _stub(2, 0, "odp:x")  # TP rank 1 must be ODP rank 1
    with pytest.raises(ValueError, match="TP rank = OTP rank"):
        FlashComm2RowParallelLinear(A, H, **g)
    with pytest.raises(ValueError, match="not divisible by the TP size 4"):
        FlashComm2RowParallelLinear(A + 2, H, **_stub_groups(4, 2, 0))


# --------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _weights(seed, dtype, bias):
    g = _gen(seed)
    w = (torch.randn(H, A, generator=g) / A**0.5).to(dtype)
    b = torch.randn(H, generator=g).to(dtype) if bias else None
    return w, b


def _inputs(seed, T, dtype):
    return torch.randn(T, A, generator=_gen(seed)).to(dtype)


def _reference(x, w, b):
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if b is not None:
        ref = ref + b.double()
        scale = scale + b.double().abs()
    return ref, scale


def _poisoned_view(x):
    """``x`` as a strided view into a larger NaN-filled buffer."""
    T, C = x.shape
    buf = torch.full((T + 3, C + 5), float("nan"), dtype=x.dtype)
    buf[1:T + 1, 2:C + 2] = x
    return buf[1:T + 1, 2:C + 2]


class _Results:
    def __init__(self, rank):
        self.rank = rank
        self.items = []

    def add(self, kind, name, ok, metric=None, detail=""):
        self.items.append(dict(kind=kind, name=name, ok=bool(ok), metric=metric,
                               detail=detail, rank=self.rank))

    def numeric(self, name, y, ref, scale, dtype):
        shape_ok = tuple(y.shape) == tuple(ref.shape)
        finite = bool(torch.isfinite(y).all())
        if not (shape_ok and finite):
            self.add("numerics", name, False, None,
                     f"shape {tuple(y.shape)} vs {tuple(ref.shape)}, finite={finite}")
            return
        err = (y.double() - ref).abs()
        if dtype == torch.float32:
            metric = float(err.max() / ref.abs().max().clamp_min(1e-30))
            ok = metric <= FP32_REL
        else:
            metric = float((err / scale.clamp_min(1e-30)).max())
            ok = metric <= BF16_FACTOR
        self.add("numerics", name, ok, metric)


def _setup_vllm(rank, world_size, tp, pp, dp):
    """vLLM's world + model-parallel groups on top of dist_utils' bare gloo world."""
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank,
                                     distributed_init_method="env://", backend="gloo")
    # DP enters the layout only through the current config (as in an engine).
    vcfg = VllmConfig(parallel_config=ParallelConfig(
        tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp))
    with set_current_vllm_config(vcfg):
        initialize_model_parallel(tensor_model_parallel_size=tp,
                                  pipeline_model_parallel_size=pp, backend="gloo")
    return vcfg


def _check_groups(res, rank, world_size, tp, pp, dp, cfg, lockstep=False):
    from vllm.distributed import get_tp_group

    from vllm_ascend_ext.distributed.parallel_state import (
        FlashComm2GroupError,
        flashcomm2_group_ranks,
        get_flashcomm2_odp_group,
        get_flashcomm2_oshared_group,
        get_flashcomm2_otp_group,
        init_flashcomm2_groups,
    )

    from vllm.distributed import get_dp_group, get_pp_group

    k = cfg.parallel_size
    expected = flashcomm2_group_ranks(world_size, tp, dp, pp, k, oshared_spans_dp=lockstep)
    # vLLM really laid the world out as (dp, pp, tp), tp innermost.
    grid = torch.arange(world_size).reshape(dp, pp, tp)
    dp_ranks = grid[:, (rank // tp) % pp, rank % tp].tolist()
    pp_ranks = grid[rank // (tp * pp), :, rank % tp].tolist()
    res.add("groups", f"k={k} vLLM DP group", get_dp_group().ranks == dp_ranks,
            detail=f"{get_dp_group().ranks} vs {dp_ranks}")
    res.add("groups", f"k={k} vLLM PP group", get_pp_group().ranks == pp_ranks,
            detail=f"{get_pp_group().ranks} vs {pp_ranks}")
    mine = lambda groups: next(g for g in groups if rank in g)  # noqa: E731
    otp, odp, osh = (get_flashcomm2_otp_group(), get_flashcomm2_odp_group(),
                     get_flashcomm2_oshared_group())
    tag = f"k={k}" + (" lockstep" if lockstep else "")
    res.add("groups", f"{tag} tp group as vLLM", get_tp_group().ranks == mine(expected.tp),
            detail=f"{get_tp_group().ranks} vs {mine(expected.tp)}")
    res.add("groups", f"{tag} otp", otp.ranks == mine(expected.otp), detail=str(otp.ranks))
    res.add("groups", f"{tag} odp", odp.ranks == mine(expected.odp), detail=str(odp.ranks))
    res.add("groups", f"{tag} oshared", osh.ranks == mine(expected.oshared),
            detail=str(osh.ranks))
    res.add("groups", f"{tag} oshared is its own communicator", osh is not odp
            and osh.device_group is not odp.device_group)
    if lockstep:
        res.add("groups", f"{tag} oshared spans the DP replicas",
                osh.world_size == dp * tp // k, detail=str(osh.ranks))
    init_flashcomm2_groups(cfg, dp_lockstep=lockstep)  # idempotent
    res.add("groups", f"{tag} idempotent init", get_flashcomm2_otp_group() is otp)
    other = type(cfg)(parallel_size=k, oshared=False, prefetch_step=1)
    try:
        init_flashcomm2_groups(other)
        res.add("groups", f"{tag} conflicting init raises", False)
    except FlashComm2GroupError as e:
        res.add("groups", f"{tag} conflicting init raises", "already exist" in str(e),
                detail=str(e))


def _run_config(res, *, tag, seed, k, dtype, oshared, bias, t_values, start_layer,
                tp_rank, P, compare_vllm_tp=False, extra_checks=False, compile_check=False):
    """Build LAYERS consecutive o_proj layers and run every T through all of them."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.distributed.parallel_state import get_flashcomm2_oshared_group
    from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

    name = f"{tag} k={k} {str(dtype)[6:]} oshared={int(oshared)} bias={int(bias)}"
    a_l = A // P
    j = tp_rank // (P // k)
    layers = [
        FlashComm2RowParallelLinear(A, H, bias=bias, params_dtype=dtype,
                                    prefix=f"model.layers.{start_layer + l}.self_attn.o_proj")
        for l in range(LAYERS)
    ]
    series = None
    if oshared:
        series = SharedWeightSeries(f"fc2-test-{name}", get_flashcomm2_oshared_group(),
                                    prefetch_step=1)
        for layer in layers:
            series.add_layer(layer)
    weights = [_weights(seed * 1000 + start_layer + l, dtype, bias) for l in range(LAYERS)]
    for layer, (w, b) in zip(layers, weights):
        layer.weight.weight_loader(layer.weight, w)
        if b is not None:
            layer.bias.weight_loader(layer.bias, b)
        if not oshared:
            ok = torch.equal(layer.weight.data, w[:, j * A // k:(j + 1) * A // k])
            res.add("loader", f"{name} {layer.prefix} shard", ok)
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)

    tp_layer = None
    if compare_vllm_tp:
        w, b = weights[0]
        tp_layer = RowParallelLinear(A, H, bias=bias, params_dtype=dtype,
                                     prefix=f"model.layers.{start_layer}.tp_ref")
        tp_layer.weight.weight_loader(tp_layer.weight, w)
        if b is not None:
            tp_layer.bias.weight_loader(tp_layer.bias, b)
        tp_layer.quant_method.process_weights_after_loading(tp_layer)

    passes = 2 if oshared else 1  # o_shared: the second pass wraps the ring
    styles = ("plain", "is_prefill", "sequence_parallel")
    for p in range(passes):
        for T in t_values:
            for l, layer in enumerate(layers):
                w, b = weights[l]
                x = _inputs(seed * 7919 + T * 31 + l * 3 + p, T, dtype)
                ref, scale = _reference(x, w, b)
                x_local = _poisoned_view(x[:, tp_rank * a_l:(tp_rank + 1) * a_l])
                style = styles[(T + l + p) % 3]
                case = f"{name} T={T} layer={start_layer + l} pass={p} {style}"
                if style == "sequence_parallel":
                    y, out_bias = layer(x_local, sequence_parallel_output=True)
                    plan = flashcomm2_plan(T, P, k)
                    pad = torch.zeros(plan.pad_rows, H, dtype=torch.float64)
                    if b is not None:
                        pad += b.double()
                    lo, hi = tp_rank * plan.block_rows, (tp_rank + 1) * plan.block_rows
                    ref_b = torch.cat([ref, pad])[lo:hi]
                    scale_b = torch.cat([scale, pad.abs()])[lo:hi]
                    res.numeric(case, y, ref_b, scale_b, dtype)
                elif style == "is_prefill":
                    y = layer(x_local, is_prefill=True)[0]
                    res.numeric(case, y, ref, scale, dtype)
                else:
                    y, out_bias = layer(x_local)
                    res.add("api", f"{case} output_bias is None", out_bias is None)
                    res.numeric(case, y, ref, scale, dtype)
                if tp_layer is not None and l == 0 and style != "sequence_parallel":
                    y_tp = tp_layer(x_local)[0]
                    rel = float((y.double() - y_tp.double()).abs().max()
                                / ref.abs().max().clamp_min(1e-30))
                    res.add("vs_vllm_tp", f"{case} vs RowParallelLinear", rel <= FP32_REL,
                            rel)

    if extra_checks:
        # skip_bias_add / return_bias=False / 3-D input.  Every layer runs, in
        # order (an o_shared series requires it), and outputs are checked only
        # after the last layer: with o_shared the bias lives in a ring slot that
        # later prefetches overwrite, so a returned bias must be the layer's own
        # copy, not a view of the slot.
        x = _inputs(seed + 5, 7, dtype)
        x_local = x[:, tp_rank * a_l:(tp_rank + 1) * a_l]
        outs = []
        for layer in layers:
            layer.skip_bias_add = True
            outs.append(layer(x_local))
            layer.skip_bias_add = False
        for layer, (y, out_bias), (w, b) in zip(layers, outs, weights):
            ref, scale = _reference(x, w, b)
            if not oshared:
                res.add("api", f"{name} {layer.prefix} skip_bias_add returns the bias",
                        out_bias is layer.bias)
            res.add("api", f"{name} {layer.prefix} skip_bias_add bias value",
                    out_bias is not None and torch.equal(out_bias, b))
            res.numeric(f"{name} {layer.prefix} skip_bias_add", y + out_bias, ref, scale,
                        dtype)
        outs = []
        for layer in layers:
            layer.return_bias = False
            outs.append(layer(x_local.reshape(1, 7, a_l)))
            layer.return_bias = True
        for layer, y, (w, b) in zip(layers, outs, weights):
            ref, scale = _reference(x, w, b)
            res.add("api", f"{name} {layer.prefix} return_bias=False gives a tensor",
                    isinstance(y, torch.Tensor) and y.shape == (1, 7, H))
            res.numeric(f"{name} {layer.prefix} 3-D input", y.reshape(7, H), ref, scale,
                        dtype)

    if compile_check:
        from torch import _dynamo

        layer, (w, b) = layers[0], weights[0]
        _dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
        for T in (7, 64, 5):
            x = _inputs(seed + 11 * T, T, dtype)
            ref, scale = _reference(x, w, b)
            y = compiled(x[:, tp_rank * a_l:(tp_rank + 1) * a_l])[0]
            res.numeric(f"{name} torch.compile(fullgraph) T={T}", y, ref, scale, dtype)

    if series is not None:
        series.close()


def _world_worker(rank, world_size, layout):
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm.config import set_current_vllm_config
    from vllm.distributed import destroy_model_parallel

    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.communication import set_poison_outputs
    from vllm_ascend_ext.distributed.parallel_state import (
        destroy_flashcomm2_groups,
        flashcomm2_groups_initialized,
        init_flashcomm2_groups,
    )

    tp, pp, dp = layout["tp"], layout["pp"], layout["dp"]
    # vLLM's CPU worker sets VLLM_DIST_IDENT (it names the shared-memory
    # segments of the TP/PP communicators); each layout sets its own, so that
    # the three layouts can share one 4-rank world.
    os.environ["VLLM_DIST_IDENT"] = layout["dist_ident"]
    vcfg = _setup_vllm(rank, world_size, tp, pp, dp)
    set_poison_outputs(True)
    res = _Results(rank)
    # vLLM order: (external_dp, dp, pp, pcp, tp) with tp innermost.
    replica = rank // (tp * pp)  # DP index (dp world) -- 0 otherwise
    stage = (rank // tp) % pp
    tp_rank = rank % tp
    try:
        with set_current_vllm_config(vcfg):
            for k in layout["ks"]:
                cfg = FlashComm2Config(parallel_size=k, oshared=True, prefetch_step=1)
                init_flashcomm2_groups(cfg)
                _check_groups(res, rank, world_size, tp, pp, dp, cfg)
                for dtype in DTYPES:
                    for oshared in layout["oshared"]:
                        bias = dtype == torch.float32
                        t_values = T_VALUES
                        if layout["name"] == "dp2xtp2" and replica == 1:
                            # A different call sequence on the other replica.
                            t_values = tuple(reversed(T_VALUES))[: 3 + oshared]
                        if layout["name"] == "pp2xtp2":
                            t_values = (3, 64)
                        fp32_plain = dtype == torch.float32 and not oshared
                        _run_config(
                            res, tag=layout["name"], seed=17 + 100 * replica + k,
                            k=k, dtype=dtype, oshared=oshared, bias=bias,
                            t_values=t_values, start_layer=stage * LAYERS,
                            tp_rank=tp_rank, P=tp, compare_vllm_tp=fp32_plain,
                            extra_checks=bias and layout.get("extra", False),
                            compile_check=fp32_plain and layout.get("compile") == k,
                        )
                destroy_flashcomm2_groups()
                res.add("groups", f"k={k} destroyed", not flashcomm2_groups_initialized())
            if layout.get("lockstep"):
                # MoE-style DP: both replicas call every layer equally often
                # (the idle one with 1-token dummy batches), so one o_shared
                # series may span them; same weights on every replica.
                cfg = FlashComm2Config(parallel_size=1, oshared=True, prefetch_step=1)
                init_flashcomm2_groups(cfg, dp_lockstep=True)
                _check_groups(res, rank, world_size, tp, pp, dp, cfg, lockstep=True)
                for dtype in DTYPES:
                    _run_config(
                        res, tag="dp2xtp2-lockstep", seed=29, k=1, dtype=dtype,
                        oshared=True, bias=dtype == torch.float32,
                        t_values=(5, 64, 3) if replica == 0 else (1, 1, 1),
                        start_layer=0, tp_rank=tp_rank, P=tp,
                    )
                destroy_flashcomm2_groups()
    finally:
        destroy_flashcomm2_groups()
        destroy_model_parallel()
    return res.items


LAYOUTS = {
    "tp4": dict(name="tp4", tp=4, pp=1, dp=1, ks=(1, 2), oshared=(False, True),
                extra=True, compile=2),
    "dp2xtp2": dict(name="dp2xtp2", tp=2, pp=1, dp=2, ks=(1,), oshared=(False, True),
                    lockstep=True),
    "pp2xtp2": dict(name="pp2xtp2", tp=2, pp=2, dp=1, ks=(1,), oshared=(False, True)),
}


@pytest.fixture(scope="module")
def world_results():
    cache = {}

    def get(name):
        if name not in cache:
            layout = dict(LAYOUTS[name], dist_ident=f"fc2-test-{os.getpid()}-{name}")
            # One bare 4-rank world for every layout: each call builds vLLM's
            # groups on it, and dist_utils tears them down after the call.
            per_rank = run_distributed(_world_worker, 4, layout, init_vllm=False,
                                       timeout=WORLD_TIMEOUT)
            cache[name] = [item for items in per_rank for item in items]
        return cache[name]

    return get


def _assert_all(items, kind=None):
    chosen = [i for i in items if kind is None or i["kind"] == kind]
    assert chosen, f"no results of kind {kind!r}"
    bad = [i for i in chosen if not i["ok"]]
    assert not bad, "\n".join(
        f"rank {i['rank']}: {i['name']} metric={i['metric']} {i['detail']}" for i in bad[:20]
    )
    return chosen


def _worst(items, dtype_name):
    vals = [i["metric"] for i in items if dtype_name in i["name"] and i["metric"] is not None]
    return max(vals) if vals else None


@pytest.mark.parametrize("world", ["tp4", "dp2xtp2", "pp2xtp2"])
def test_numerics_match_reference(world_results, world):
    items = world_results(world)
    numerics = _assert_all(items, "numerics")
    # every T of every config reached the comparison on every rank
    names = {i["name"] for i in numerics}
    for T in (T_VALUES if world != "pp2xtp2" else (3, 64)):
        assert any(f" T={T} " in n for n in names), T
    for dtype_name in ("float32", "bfloat16"):
        assert _worst(numerics, dtype_name) is not None
    print(f"\n{world}: {len(numerics)} comparisons; worst fp32 rel err "
          f"{_worst(numerics, 'float32'):.2e} (bound {FP32_REL:g}); worst bf16 err/S "
          f"{_worst(numerics, 'bfloat16'):.2e} (bound {BF16_FACTOR:g})")


@pytest.mark.parametrize("world", ["tp4", "dp2xtp2", "pp2xtp2"])
def test_groups_live(world_results, world):
    _assert_all(world_results(world), "groups")


@pytest.mark.parametrize("world", ["tp4", "dp2xtp2"])
def test_matches_vllm_row_parallel_linear(world_results, world):
    _assert_all(world_results(world), "vs_vllm_tp")


def test_weight_loader_and_api_in_world(world_results):
    items = world_results("tp4")
    _assert_all(items, "loader")
    api = _assert_all(items, "api")
    assert any("skip_bias_add" in i["name"] for i in api)
    assert any("return_bias=False" in i["name"] for i in api)


def test_sequence_parallel_and_is_prefill_and_oshared_covered(world_results):
    names = [i["name"] for i in world_results("tp4") if i["kind"] == "numerics"]
    for k in (1, 2):
        for o in (0, 1):
            for style in ("sequence_parallel", "is_prefill", "plain"):
                assert any(f"k={k} " in n and f"oshared={o}" in n and n.endswith(style)
                           for n in names), (k, o, style)
    assert any("torch.compile(fullgraph)" in n for n in names)
    # PP: the second stage's series starts at layer 3 (not a multiple of n=2)
    pp_names = [i["name"] for i in world_results("pp2xtp2") if i["kind"] == "numerics"]
    assert any("oshared=1" in n and "layer=3" in n for n in pp_names)


def test_oshared_spans_dp_replicas_in_lockstep(world_results):
    """MoE-style DP: a 4-rank o_shared series across both replicas, one busy and
    one running 1-token dummy batches, gives the reference numerics everywhere."""
    items = world_results("dp2xtp2")
    lock = [i for i in items if i["kind"] == "numerics" and "dp2xtp2-lockstep" in i["name"]]
    assert {i["rank"] for i in lock} == {0, 1, 2, 3}
    assert any(" T=64 " in i["name"] for i in lock if i["rank"] in (0, 1))
    assert all(" T=1 " in i["name"] for i in lock if i["rank"] in (2, 3))
    _assert_all(lock)
    spans = [i for i in items if i["name"] == "k=1 lockstep oshared spans the DP replicas"]
    assert len(spans) == 4 and all(i["ok"] for i in spans)
