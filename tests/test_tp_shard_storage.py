"""o_shared on TP shards (ops/tp_shard/): real vLLM layers on real gloo worlds.

Each case builds one stack of o_proj layers twice from the same checkpoint
tensors, the way the model install builds them:

- FlashComm2 without o_shared (every rank holds its whole OTP shard);
- o_shared on TP shards (every rank holds plain TP's shard; FlashComm2's
  weight is all-gathered into the ring).

Then a mixed sequence of small (plain TP) and large (FlashComm2) passes runs
through both, and the outputs must be equal bit for bit. Small passes must
leave the storage exactly as they found it (the condition for capturing them
in a graph), and the bytes held must be plain TP's plus the ring.
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_ascend_ext.cpu_attention import cpu_has_amx
from tests.dist_utils import run_distributed

A, H = 64, 48
LAYERS = 5
THRESHOLD = 8
SMALL, LARGE = (1, 2, 3, 5, 8), (9, 17, 33)
PASSES = 10


def _qwen3_w8a8_config(activations: str):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    from vllm_ascend_ext.tools.tiny_models.w8a8 import quantization_config

    return CompressedTensorsConfig.from_config(quantization_config("Qwen3ForCausalLM",
                                                                   activations))


def _checkpoint(quant: str, start: int):
    """Per layer: the tensors a checkpoint holds for its o_proj."""
    from vllm_ascend_ext.tools.tiny_models.w8a8 import quantize_per_channel

    g = torch.Generator().manual_seed(11 + start)
    out = []
    for _ in range(LAYERS):
        w = torch.randn(H, A, generator=g) * 0.05
        if quant == "fp32":
            out.append({"weight": w, "bias": torch.randn(H, generator=g)})
        else:
            w_q, w_s = quantize_per_channel(w)
            tensors = {"weight": w_q, "weight_scale": w_s}
            if quant == "w8a8-static":
                tensors["input_scale"] = torch.tensor([3.0 / 127.0])
            out.append(tensors)
    return out


def _post_load_pass(root: torch.nn.Module, only=None) -> None:
    """vLLM's: every module with a quant method, parents first (``only``: just
    these modules, as a caller that processes the o_proj layers alone does)."""
    default = torch.get_default_dtype()
    if any(p.dtype == torch.bfloat16 for p in root.parameters()):
        torch.set_default_dtype(torch.bfloat16)  # as during a bf16 engine's load
    try:
        for module in root.modules() if only is None else only:
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
    finally:
        torch.set_default_dtype(default)


def _build(quant: str, start: int, step: int, adaptive: int, k: int, tp_shard: bool,
           layers_only: bool = False):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import get_flashcomm2_odp_group
    from vllm_ascend_ext.compat import keep_cpu_linear_weight_plain
    from vllm_ascend_ext.models.flashcomm2_install import flashcomm2_o_proj_for
    from vllm_ascend_ext.ops.cpu_int8 import keep_int8_weight_plain
    from vllm_ascend_ext.ops.resident_slice import attach_resident_slice
    from vllm_ascend_ext.ops.tp_shard.specs import shard_specs_for
    from vllm_ascend_ext.ops.tp_shard.storage import TPShardStorage

    cfg = FlashComm2Config(k, tp_shard, step, adaptive_tokens=adaptive)
    qc = None if quant == "fp32" else _qwen3_w8a8_config(quant.split("-")[1])
    dtype = torch.float32 if quant == "fp32" else torch.bfloat16
    layers = torch.nn.ModuleList()
    storage = None
    with set_current_vllm_config(VllmConfig()):
        for i in range(start, start + LAYERS):
            name = f"model.layers.{i}.self_attn.o_proj"
            old = RowParallelLinear(A, H, bias=quant == "fp32", params_dtype=dtype,
                                    quant_config=qc, prefix=name, return_bias=False)
            new = flashcomm2_o_proj_for(old, cfg, name)
            if tp_shard:
                if storage is None:
                    specs = shard_specs_for(old)
                    if specs is None:
                        return None
                    storage = TPShardStorage(f"test-{quant}-{start}-{step}",
                                             get_flashcomm2_odp_group(), step, specs)
                storage.add_layer(new, old, i)
            elif adaptive:
                # FlashComm2 alone keeps plain TP's o_proj for its small side,
                # as the model install does. Here both weights stay plain
                # tensors, as TP-shard storage keeps its shards and gathers, so
                # that both sides run the same kernels as the storage's and
                # compare bit for bit (vLLM CPU's oneDNN int8 GEMM is not exact
                # without VNNI).
                for module in (old, new):
                    method = module.quant_method
                    method.process_weights_after_loading = keep_int8_weight_plain(
                        module, keep_cpu_linear_weight_plain(
                            module, method.process_weights_after_loading), name)
                attach_resident_slice(new, old)
            del old
            layers.append(new)
    for layer, tensors in zip(layers, _checkpoint(quant, start)):
        for pname, value in tensors.items():
            param = getattr(layer, pname)
            param.weight_loader(param, value)
    _post_load_pass(layers, only=list(layers) if layers_only else None)
    return layers, storage


CASES = {
    # name: (quant, start, prefetch step, adaptive threshold, OTP size, compiled,
    #        post-load on the FlashComm2 layers only)
    "fp32-step1": ("fp32", 0, 1, THRESHOLD, 1, False, False),
    "fp32-start7-step2": ("fp32", 7, 2, THRESHOLD, 1, False, False),  # a later PP stage
    "fp32-step0": ("fp32", 0, 0, THRESHOLD, 1, False, False),
    # post-load run on the FlashComm2 layers only, never on their slices
    "fp32-layers-only-post-load": ("fp32", 2, 1, THRESHOLD, 1, False, True),
    "fp32-compiled": ("fp32", 0, 1, THRESHOLD, 1, True, False),
    "fp32-always-fc2-compiled": ("fp32", 0, 2, 0, 1, True, False),
    "w8a8-dynamic": ("w8a8-dynamic", 0, 1, THRESHOLD, 1, False, False),
    "w8a8-static": ("w8a8-static", 0, 2, THRESHOLD, 1, False, False),
}
CASES_4 = {  # four ranks: OTP size 2 gathers over ODP pairs
    "tp4-otp2-fp32": ("fp32", 0, 1, THRESHOLD, 2, False, False),
    "tp4-otp1-w8a8-dynamic": ("w8a8-dynamic", 3, 2, THRESHOLD, 1, False, False),
}


# The test's own counting wrappers (ops/side_counter.py), not the layer's state.
_COUNTING = {"adaptive_side_counts", "forward_flashcomm2", "forward_row_parallel"}


def _leaf(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else id(v)


def _python_state(obj) -> dict:
    """Every attribute of ``obj``, one level into lists, tuples and dicts:
    values for scalars, identities for the rest (a tensor's contents are the
    ring's check)."""
    out = {}
    for name, v in vars(obj).items():
        if name in _COUNTING:
            continue
        if isinstance(v, (list, tuple)):
            out[name] = (type(v), tuple(_leaf(e) for e in v))
        elif isinstance(v, dict):
            out[name] = (dict, tuple((key, _leaf(e)) for key, e in v.items()))
        else:
            out[name] = _leaf(v)
    return out


def _run_case(rank, world_size, case):
    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import (
        destroy_flashcomm2_groups,
        init_flashcomm2_groups,
    )

    quant, start, step, adaptive, k, compiled, layers_only = case
    init_flashcomm2_groups(FlashComm2Config(k, True, step, adaptive_tokens=adaptive),
                           dp_lockstep=False)
    try:
        built = _build(quant, start, step, adaptive, k, tp_shard=True, layers_only=layers_only)
        if built is None:
            return {"no_spec": True}
        shared, storage = built
        full, _ = _build(quant, start, step, adaptive, k, tp_shard=False)
        from vllm_ascend_ext.ops.side_counter import count_sides

        counts = [count_sides(layer) for layer in shared] if adaptive else []
        a_l = A // world_size
        dtype = torch.float32 if quant == "fp32" else torch.bfloat16

        def stack(layers, xs):  # every layer in one graph, as vLLM compiles a model
            return [layer(x) for layer, x in zip(layers, xs)]

        run = torch.compile(stack, dynamic=True, fullgraph=True) if compiled else stack
        rng = random.Random(start * 10 + step)  # the same sequence on every rank
        g = torch.Generator().manual_seed(5)
        passes = []
        for _ in range(PASSES):
            T = rng.choice(SMALL if rng.random() < 0.5 else LARGE)
            xs = [(torch.randn(T, A, generator=g)[:, rank * a_l:(rank + 1) * a_l]).to(dtype)
                  for _ in shared]
            for works in storage.ring.slot_work:  # let in-flight gathers land (kept pending)
                for w in works or ():
                    w.wait()
            before = storage.ring.state()
            # The layers' runtime records too: what their forwards read.
            watched = (storage, *shared, *(layer.runtime for layer in shared))
            py_before = [_python_state(o) for o in watched]
            contents = [{a: t.clone() for a, t in slot.items()} for slot in storage.ring.slots]
            ys_shared = run(shared, xs)
            after = storage.ring.state()
            py_after = [_python_state(o) for o in watched]
            same_contents = all(torch.equal(t, slot[a]) for old, slot in
                                zip(contents, storage.ring.slots) for a, t in old.items())
            ys_full = run(full, xs)
            ys_shared = [y[0] if isinstance(y, tuple) else y for y in ys_shared]
            ys_full = [y[0] if isinstance(y, tuple) else y for y in ys_full]
            passes.append({
                "T": T,
                "equal": all(torch.equal(a, b) for a, b in zip(ys_shared, ys_full)),
                "rel_err": max(float((a.double() - b.double()).abs().max()
                                     / b.double().abs().max())
                               for a, b in zip(ys_shared, ys_full)),
                "state_unchanged": before == after and same_contents,
                "python_state_unchanged": py_before == py_after,
                "gathers": after[4] - before[4],
            })
        storage.synchronize()
        report = storage.memory_report()
        return {"passes": passes, "report": report,
                "calls": [[c.flashcomm2, c.row_parallel] for c in counts],
                "declared_by": storage.specs.declared_by}
    finally:
        destroy_flashcomm2_groups()


def _every_case(rank, world_size, cases):
    import gc

    out = {}
    for name, case in cases.items():
        out[name] = _run_case(rank, world_size, case)
        # vLLM's layers sit in reference cycles (a parameter's weight_loader
        # is a bound method of its layer): free this case's now, and not in
        # the middle of a later case's torch.compile trace, where a vLLM CPU
        # oneDNN handle's destructor fails under fake tensors and the worker
        # crashes.
        gc.collect()
    return out


@pytest.fixture(scope="module")
def runs():
    out = {}
    for world, cases in ((2, CASES), (4, CASES_4)):
        per_rank = run_distributed(_every_case, world, cases, timeout=600)
        for name in cases:
            out[name] = [per_rank[r][name] for r in range(world)]
    return out


def _weight_bytes(quant: str, rows: int) -> int:
    return rows * H * (4 if quant == "fp32" else 1)


@pytest.mark.parametrize("name", list(CASES) + list(CASES_4))
def test_tp_shards_equal_flashcomm2_and_small_steps_are_state_free(name, runs):
    quant, start, step, adaptive, k, compiled, _ = {**CASES, **CASES_4}[name]
    out = runs[name]
    if out[0].get("no_spec"):
        assert quant != "fp32"
        assert cpu_has_amx(), "only vLLM CPU's AMX int8 route has no gather spec"
        pytest.skip("W8A8 on an AMX CPU (amx_int8): vLLM packs the int8 weight for AMX, "
                    "which declares nothing to gather; o_shared keeps round-robin storage")
    world = len(out)
    D = world // k
    for rank, res in enumerate(out):
        passes = res["passes"]
        sides = {p["T"] <= adaptive for p in passes}
        assert sides == ({True, False} if adaptive else {False}), passes
        for p in passes:
            if compiled and not adaptive:
                # torch.compile traces FlashComm2 itself: the ring's ops
                # (mutating their anchor) make the traced graphs differ, and
                # with them the matmul's input layout, so the rounding may.
                assert p["rel_err"] < 1e-6, (rank, p)
            else:
                assert p["equal"], (rank, p)
            if p["T"] <= adaptive:
                # Plain TP from the shard: no gather; the ring's slots, their
                # contents, pending gathers and counters as they were, and no
                # Python attribute of the storage or a layer changed (a
                # captured graph would replay the step without running Python).
                assert p["state_unchanged"] and p["gathers"] == 0, (rank, p)
                assert p["python_state_unchanged"], (rank, p)
            else:
                assert p["gathers"] == LAYERS, (rank, p)
        if adaptive:  # the switch counts its calls (threshold 0 has no switch)
            n_small = sum(p["T"] <= adaptive for p in passes)
            assert all(c == [PASSES - n_small, n_small] for c in res["calls"]), res["calls"]
        r = res["report"]
        # Bytes: plain TP's shard of every layer (weight a/P columns, bias,
        # scales) plus one gathered OTP weight per slot.
        shard_weight = _weight_bytes(quant, A // world)
        extra = {"fp32": H * 4, "w8a8-dynamic": H * 4, "w8a8-static": H * 4 + 4}[quant]
        assert r.shard_bytes == LAYERS * (shard_weight + extra), (rank, r)
        assert r.slots == max(step, 1)
        assert r.gathered_bytes_per_layer == _weight_bytes(quant, A // k)
        assert r.slot_bytes == r.slots * r.gathered_bytes_per_layer
        assert r.group_size == D
        assert r.received_bytes_per_layer == r.gathered_bytes_per_layer * (D - 1) // D


def _all_to_all_input_is_the_activation(rank, world_size):
    """Eager FlashComm2 with T % P == 0 (k = 1) sends the activation itself:
    no padding copy (before: an unconditional F.pad copied it every call)."""
    import vllm_ascend_ext.ops.flashcomm2_oproj as op_mod
    from vllm_ascend_ext.config import FlashComm2Config
    from vllm_ascend_ext.distributed.parallel_state import (
        destroy_flashcomm2_groups,
        init_flashcomm2_groups,
    )

    init_flashcomm2_groups(FlashComm2Config(1, False, 1, adaptive_tokens=0), dp_lockstep=False)
    real = op_mod.all_to_all_dim0
    seen = []
    op_mod.all_to_all_dim0 = lambda x, group: (seen.append(x.data_ptr()), real(x, group))[1]
    try:
        layer = op_mod.FlashComm2RowParallelLinear(A, H, bias=False, params_dtype=torch.float32,
                                                   prefix="model.layers.0.self_attn.o_proj",
                                                   return_bias=False)
        layer.weight.data.normal_()
        layer.quant_method.process_weights_after_loading(layer)
        out = {}
        for T in (4, 5):
            x = torch.randn(T, A // world_size)
            seen.clear()
            layer(x)
            out[T] = seen == [x.data_ptr()]
        return out
    finally:
        op_mod.all_to_all_dim0 = real
        destroy_flashcomm2_groups()


def test_eager_flashcomm2_sends_unpadded_activations_without_a_copy():
    for res in run_distributed(_all_to_all_input_is_the_activation, 2):
        assert res == {4: True, 5: False}, res
