"""Model-level contracts inside a gloo worker (docs/ascend.md, contracts 1, 6):
vLLM's DeepSeek and Qwen models built under vllm-ascend's platform with its
worker patches, our install on them, and the real ``AscendMLAImpl.forward``
calling our o_proj.

Every function returns plain data (strings, numbers) for the parent to assert.
"""

from __future__ import annotations

import pickle
import re
from types import SimpleNamespace
from typing import Any

import torch

from vllm_ascend_ext.ops.side_counter import SideCounts, count_sides, side_counts

#: the name vllm-ascend's MLA impl keeps the o_proj under (attention/mla_v1.py)
IMPL_O_PROJ = "o_proj"


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def fresh(vllm_config: Any) -> Any:
    """A private copy: each model registers its attention layers by name in
    its config's ``static_forward_context``."""
    return pickle.loads(pickle.dumps(vllm_config))


def build_model(vllm_config: Any, *, ours: bool = True) -> torch.nn.Module:
    """Our registered class (vLLM's + the FlashComm2 mixin) through vLLM's
    ``initialize_model``, or vLLM's own class."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_current_vllm_config(vllm_config), set_default_torch_dtype(
            vllm_config.model_config.dtype):
        if ours:
            return initialize_model(vllm_config=vllm_config)
        arch = vllm_config.model_config.architectures[0]
        if arch.startswith("Deepseek"):
            from vllm.model_executor.models import deepseek_v2 as mod
        else:
            from vllm.model_executor.models import qwen3 as mod
        return getattr(mod, arch)(vllm_config=vllm_config, prefix="")


def impls_of(attn: torch.nn.Module) -> list[tuple[str, Any]]:
    """Every attention implementation under one attention module (not
    ``nn.Module``s: vLLM keeps them as plain attributes named ``impl``)."""
    return [(name, m.__dict__["impl"]) for name, m in attn.named_modules()
            if m.__dict__.get("impl") is not None]


def describe(model: torch.nn.Module) -> list[dict]:
    """What each hidden layer's attention is made of."""
    rows = []
    for layer in model.model.layers:
        attn = layer.self_attn
        row = {
            "attn": _qualname(attn),
            "children": {n: _qualname(m) for n, m in attn.named_children()},
            "o_proj": _qualname(attn.o_proj),
            "o_proj_method": _qualname(attn.o_proj.quant_method),
            "impls": [(n, _qualname(i), getattr(i, IMPL_O_PROJ, None) is attn.o_proj,
                       hasattr(i, IMPL_O_PROJ)) for n, i in impls_of(attn)],
        }
        if hasattr(attn, "mla_attn"):
            row["mla_inner"] = _qualname(attn.mla_attn.mla_attn)
        rows.append(row)
    return rows


def close(model: torch.nn.Module) -> None:
    state = getattr(model, "flashcomm2", None)
    if state is not None:
        state.close()


def stale_holder_errors(vllm_config: Any) -> dict[str, str]:
    """The stale-holder check on vLLM's DeepSeek as vllm-ascend builds it:
    (a) an attribute of the real ``AscendMLAImpl`` holding the o_proj under a
    name we do not rewire; (b) the swap as it was before the fix (module
    children only), which leaves the impl's own ``o_proj`` on the old module."""
    import vllm_ascend_ext.models.flashcomm2_install as fi
    from tests.dist_utils import destroy_flashcomm2_groups_together

    out = {}

    def children_only(root, old, new):
        hits = 0
        for parent in root.modules():
            for child_name, child in list(parent._modules.items()):
                if child is old:
                    parent._modules[child_name] = new
                    hits += 1
        return hits

    for case in ("hidden attribute", "children only"):
        cfg = fresh(vllm_config)
        model = build_model(cfg, ours=False)
        if case == "hidden attribute":
            for layer in model.model.layers:
                for _, impl in impls_of(layer.self_attn):
                    impl.kept_for_later = impl.o_proj
        saved = fi.replace_module
        if case == "children only":
            fi.replace_module = children_only
        try:
            from vllm.config import set_current_vllm_config

            with set_current_vllm_config(cfg):
                fi.install_flashcomm2(model, cfg)
            out[case] = "no error"
        except fi.StaleOProjReference as e:
            out[case] = str(e)
        finally:
            fi.replace_module = saved
            destroy_flashcomm2_groups_together()
        del model
    return out


# --------------------------------------------------------------------------
# the real AscendMLAImpl.forward around our o_proj
# --------------------------------------------------------------------------


def _o_proj_weights(num_layers: int, h: int, a: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(20261202)
    return [torch.randn(h, a, generator=g) / a ** 0.5 for _ in range(num_layers)]


def load_o_projs(model: torch.nn.Module, weights: list[torch.Tensor]) -> None:
    """Each layer's o_proj through its own weight loader (o_shared non-owners
    ignore it), then its quant method's post-processing, in layer order, as
    vLLM's loader runs it (o_shared's series finalises on the first call)."""
    for layer, w in zip(model.model.layers, weights):
        p = layer.self_attn.o_proj.weight
        p.weight_loader(p, w)
    for layer in model.model.layers:
        o_proj = layer.self_attn.o_proj
        o_proj.quant_method.process_weights_after_loading(o_proj)


def replace_attention_kernels(impl: Any, attention_out: dict) -> None:
    """Replace the NPU-kernel stages of one real ``AscendMLAImpl``: its
    preprocessing (RMSNorm, RoPE and KV-cache kernels) and its decode and
    prefill attention (``npu_fused_infer_attention_score``). They hand back
    ``attention_out["out"]`` (this rank's heads, ``[T, heads * v_head_dim]``),
    decode rows first, as vllm-ascend orders a batch. ``forward`` itself, and
    everything it does with the result, is vllm-ascend's."""
    from vllm_ascend.attention.mla_v1 import (
        DecodeMLAPreprocessResult,
        PrefillMLAPreprocessResult,
    )

    def mla_preprocess(layer_name, hidden_states, kv_cache, md):
        out = attention_out["out"]
        nd, na = md.num_decode_tokens, md.num_actual_tokens
        decode = DecodeMLAPreprocessResult(ql_nope=out[:nd]) if md.num_decodes else None
        prefill = PrefillMLAPreprocessResult(q_nope=out[nd:na]) if md.num_prefills else None
        return decode, prefill

    impl._mla_preprocess = mla_preprocess
    impl._forward_decode = lambda ql_nope, *args: ql_nope
    impl._forward_prefill = lambda q_nope, *args: q_nope


def _metadata(num_decodes: int, prefill_lens: list[int]) -> Any:
    """The fields of vllm-ascend's MLA metadata that ``forward`` reads (its
    builder needs a model runner; a collaborator stand-in)."""
    n = num_decodes + sum(prefill_lens)
    return SimpleNamespace(num_decodes=num_decodes, num_prefills=len(prefill_lens),
                           num_decode_tokens=num_decodes, num_actual_tokens=n)


#: (name, decode tokens, prefill lengths): vllm-ascend orders decodes first
BATCHES = (("prefill", 0, [5]), ("decode", 3, []), ("mixed", 2, [4]))


def mla_forward_through_real_impl(rank: int, vllm_config: Any) -> dict:
    """Our model (FlashComm2 k=1 + o_shared) and vLLM's own, both built by
    vllm-ascend; the same attention outputs through every layer's real
    ``DeepseekV2MLAAttention -> AscendMultiHeadLatentAttention ->
    vllm::mla_forward -> AscendMLAImpl.forward``; our o_proj vs vllm-ascend's
    ``AscendRowParallelLinear``."""
    from vllm.config import set_current_vllm_config
    from vllm_ascend.ascend_forward_context import set_ascend_forward_context

    # "ours": FlashComm2 on every pass (threshold 0), so each layer runs the
    # ring; "slice": the default threshold, under which these small batches
    # run the resident slice (vllm-ascend's own AscendRowParallelLinear).
    configs = {"ours": fresh(vllm_config), "slice": fresh(vllm_config),
               "plain": fresh(vllm_config)}
    configs["ours"].additional_config = {**configs["ours"].additional_config,
                                         "flashcomm2_adaptive_tokens": 0}
    models = {"ours": build_model(configs["ours"]), "slice": build_model(configs["slice"]),
              "plain": build_model(configs["plain"], ours=False)}
    hf = vllm_config.model_config.hf_text_config
    L, h = hf.num_hidden_layers, hf.hidden_size
    a = hf.num_attention_heads * hf.v_head_dim
    weights = _o_proj_weights(L, h, a)
    tp = vllm_config.parallel_config.tensor_parallel_size
    a_local = a // tp
    calls: dict[str, list] = {name: [] for name in models}
    feed: dict = {}
    for name, model in models.items():
        load_o_projs(model, weights)
        for layer in model.model.layers:
            attn = layer.self_attn
            for _, impl in impls_of(attn):
                replace_attention_kernels(impl, feed)
                # the runner binds each layer's KV cache; only its shape is read
                impl_layer = attn.mla_attn.mla_attn
                impl_layer.kv_cache = [torch.zeros(1, 16, 1, hf.kv_lora_rank)]

            def record(module, args, kwargs, _calls=calls[name]):
                _calls.append(kwargs.get("is_prefill", "missing"))

            attn.o_proj.register_forward_pre_hook(record, with_kwargs=True)
            if getattr(attn.o_proj, "adaptive_tokens", 0):
                count_sides(attn.o_proj)

    g = torch.Generator().manual_seed(7)
    out: dict = {"batches": {}}
    for batch, nd, prefills in BATCHES:
        md = _metadata(nd, prefills)
        T = md.num_actual_tokens
        hidden = torch.randn(T, h, generator=g)
        positions = torch.arange(T)
        # this rank's heads of the attention output, different per layer
        full = [torch.randn(T, a, generator=g) for _ in range(L)]
        heads = [f[:, rank * a_local:(rank + 1) * a_local] for f in full]
        ys = {}
        for name, model in models.items():
            cfg = configs[name]
            layers = model.model.layers
            attn_md = {layer.self_attn.mla_attn.mla_attn.layer_name: md for layer in layers}
            ys[name] = []
            with set_current_vllm_config(cfg), set_ascend_forward_context(
                    attn_md, cfg, num_tokens=T):
                for i, layer in enumerate(layers):
                    feed["out"] = heads[i]
                    ys[name].append(layer.self_attn(positions, hidden, None))
        gap = max(float((y - z).abs().max()) for name in ("ours", "slice")
                  for y, z in zip(ys[name], ys["plain"]))
        scale = max(float(z.abs().max()) for z in ys["plain"])
        math = max(float((y - f @ w.t()).abs().max())
                   for y, f, w in zip(ys["ours"], full, weights))
        out["batches"][batch] = {"gap": gap, "scale": scale, "vs_math": math}
    out["is_prefill"] = calls
    out["o_proj_classes"] = {n: sorted({_qualname(l.self_attn.o_proj) for l in m.model.layers})
                             for n, m in models.items()}
    out["series"] = {}
    for name in ("ours", "slice"):
        series = models[name].flashcomm2.series
        storage = models[name].flashcomm2.storage
        out["series"][name] = {
            "storage": storage, "layers": len(series.layers), "waits": series.num_waits,
            "transfers": series.num_gathers if storage == "tp_shard" else series.num_broadcasts,
            "row_parallel_calls": sum(
                (side_counts(l.self_attn.o_proj) or SideCounts()).row_parallel
                for l in models[name].model.layers)}
    out["slice_classes"] = sorted({_qualname(l.self_attn.o_proj.resident_slice)
                                   for l in models["slice"].model.layers})
    for m in models.values():
        close(m)
    return out


def stale_message_names(message: str) -> list[str]:
    """``Class.attribute`` holders named in a ``StaleOProjReference`` message."""
    return re.findall(r"held by ([\w.]+)", message)
