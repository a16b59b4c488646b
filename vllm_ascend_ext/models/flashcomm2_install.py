"""Put the FlashComm2 o_proj (and its o_shared series) into a built vLLM model.

Our model classes are vLLM's own classes plus one step after ``__init__``:
``install_flashcomm2`` walks the freshly built (not yet loaded) model, and
swaps every hidden layer's ``self_attn.o_proj`` for the FlashComm2 op.  With
the flags off it does nothing, so the model is exactly vLLM's.

Why a swap after construction rather than re-implementing the attention
classes: vLLM builds o_proj in half a dozen places (MLA, non-MLA DeepSeek,
Qwen2/3/3-MoE), and re-implementing them would fork code that changes every
release.  The swap touches only the o_proj, before any weight is loaded, one
layer at a time, so peak memory grows by at most one layer's o_proj.

Hidden-layer filtering: only layers with index < ``num_hidden_layers`` take
part.  DeepSeek's MTP layer (index == ``num_hidden_layers``) keeps vLLM's
``RowParallelLinear``; vLLM's main model skips its weights anyway, and the MTP
draft model is vLLM's class, which we never touch.
"""

from __future__ import annotations

import atexit
import itertools
import weakref
from dataclasses import dataclass, field

import torch.nn as nn

from vllm_ascend_ext.logger import init_logger

logger = init_logger(__name__)

_series_ids = itertools.count()


@dataclass
class FlashComm2ModelState:
    """What ``install_flashcomm2`` did to one model instance."""

    config: object  # FlashComm2Config
    o_proj_prefixes: list[str] = field(default_factory=list)
    #: Each FlashComm2 o_proj's runtime record (ops/oproj_runtime.py), in
    #: layer order: what its forward reads, and the index its ops take.
    runtimes: list = field(default_factory=list)
    #: o_shared's store when it is on: a TPShardStorage or a SharedWeightSeries.
    series: object | None = None
    #: oshared_storage.TP_SHARD or ROUND_ROBIN (None with o_shared off), and why.
    storage: str | None = None
    storage_reason: str = ""
    closed: bool = False

    def close(self) -> None:
        """Drain o_shared's broadcasts, release the series and our groups.

        vLLM 0.32 offers a plugin no teardown hook, so this runs at worker
        exit (``atexit``); it tolerates vLLM having torn down
        torch.distributed first.
        """
        if self.closed:
            return
        self.closed = True
        from vllm_ascend_ext.distributed.parallel_state import destroy_flashcomm2_groups

        try:
            if self.series is not None:
                self.series.close()
        except RuntimeError as e:  # process group already gone
            logger.debug("o_shared series close: %s", e)
        finally:
            destroy_flashcomm2_groups()


def _o_proj_sites(model: nn.Module, num_hidden_layers: int):
    from vllm.model_executor.layers.linear import RowParallelLinear
    from vllm.model_executor.models.utils import extract_layer_index

    for name, module in model.named_modules():
        if not name.endswith("self_attn.o_proj") or not isinstance(module, RowParallelLinear):
            continue
        layer_idx = extract_layer_index(name)
        if layer_idx >= num_hidden_layers:
            continue  # MTP / spec-decode layers keep vLLM's o_proj
        yield name, layer_idx, module


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Point every holder of ``old`` that we know of at ``new``:

    - every parent that holds ``old`` as a child (MLA keeps the same o_proj
      object twice: the attention's ``o_proj`` and the MLA wrapper's);
    - every attention implementation that keeps a private ``o_proj``
      (vllm-ascend's ``AscendMLAImpl`` stores ``kwargs["o_proj"]``, handed
      over by its MLA wrapper through vLLM's ``MLAAttention``; the impl is not
      an ``nn.Module``, so walking children never finds it).
    """
    hits = 0
    for parent in root.modules():
        for child_name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[child_name] = new
                hits += 1
        impl = parent.__dict__.get("impl")
        if impl is not None and getattr(impl, "o_proj", None) is old:
            impl.o_proj = new
            hits += 1
    return hits


class StaleOProjReference(RuntimeError):
    """Something we do not know how to rewire still holds a replaced o_proj."""


def _holder_names(obj: object, expected: object = None) -> list[str]:
    """Readable names of what still references ``obj`` (for the error),
    leaving out ``expected`` (a holder we put there on purpose).

    Plain loops on purpose: a comprehension mentioning ``obj`` would close
    over it, and that closure cell would show up as one more holder."""
    import gc
    import types

    names = []
    for ref in gc.get_referrers(obj):
        if isinstance(ref, types.FrameType):
            continue  # the caller's own frame
        if expected is not None and ref is expected:
            continue
        if isinstance(ref, types.MethodType) and ref.__self__ is obj:
            continue  # its own bound methods (e.g. parameters' weight_loader)
        owner, attrs = ref, getattr(ref, "__dict__", None)
        if isinstance(ref, dict):
            owner, attrs = None, ref
            for o in gc.get_referrers(ref):
                if getattr(o, "__dict__", None) is ref:
                    owner = o
        keys = []
        if isinstance(attrs, dict):
            for k, v in attrs.items():
                if v is obj:
                    keys.append(k)
        for k in keys:
            if owner is None:
                names.append(f"a dict under key {k!r}")
            else:
                names.append(f"{type(owner).__module__}.{type(owner).__qualname__}.{k}")
        if not keys:
            names.append(f"a {type(ref).__module__}.{type(ref).__qualname__} object")
    return names


def check_no_stale_o_proj(replaced: dict[str, weakref.ref],
                          kept_by: dict[str, nn.Module] | None = None) -> None:
    """Every replaced o_proj must be gone once the swap is done: a survivor
    is still referenced somewhere, and a forward through that reference
    would run weights that are never loaded (silent garbage).

    ``kept_by[name]``: the FlashComm2 layer that keeps the old o_proj as its
    resident slice (``ops/resident_slice.py``); that one holder is expected,
    and loaded, and any other is still stale."""
    import gc

    gc.collect()
    kept_by = kept_by or {}
    lines = []
    for name, ref in replaced.items():
        if ref() is None:
            continue
        keeper = kept_by.get(name)
        expected = keeper._modules if keeper is not None else None
        holders = _holder_names(ref(), expected)  # no other strong reference on this frame
        if keeper is not None and not holders:
            continue
        lines.append(f"{name}: held by {', '.join(holders) or 'an unknown object'}")
    if lines:
        raise StaleOProjReference(
            "FlashComm2 replaced these o_proj layers, but something still holds the old "
            "ones (their weights are never loaded, so any call through them returns "
            "garbage):\n  " + "\n  ".join(lines)
            + "\nvllm-ascend-ext rewires nn.Module parents and attention impls' `o_proj`; "
            "this holder is unknown to it. Please report it with your vLLM / vllm-ascend "
            "versions.")


def install_flashcomm2(model: nn.Module, vllm_config) -> FlashComm2ModelState | None:
    from vllm_ascend_ext.config import get_flashcomm2_config
    from vllm_ascend_ext.distributed.settings_agreement import agree_on_settings

    # Every rank agrees first, also one whose flags say FlashComm2 is off: a
    # host with other flags would otherwise build other groups and hang.
    cfg = get_flashcomm2_config(vllm_config, agree=agree_on_settings)
    if not cfg.enabled:
        return None

    from vllm.distributed import get_pp_group

    from vllm_ascend_ext.distributed.parallel_state import (
        dp_replicas_in_lockstep,
        get_flashcomm2_oshared_group,
        init_flashcomm2_groups,
    )
    from vllm_ascend_ext.ops.resident_slice import attach_resident_slice, resident_slice_of

    dp_lockstep = dp_replicas_in_lockstep(vllm_config)
    init_flashcomm2_groups(cfg, dp_lockstep=dp_lockstep)
    hf_config = vllm_config.model_config.hf_text_config
    state = FlashComm2ModelState(config=cfg)
    sites = list(_o_proj_sites(model, hf_config.num_hidden_layers))
    if cfg.oshared and sites:
        _create_oshared_store(state, cfg, sites[0][2],
                              f"o_proj.pp{get_pp_group().rank_in_group}.{next(_series_ids)}")

    from vllm_ascend_ext.ops.tp_shard.storage import TPShardStorage

    replaced: dict[str, weakref.ref] = {}
    kept_by: dict[str, nn.Module] = {}
    while sites:
        # Popped, not iterated: each old o_proj is freed as soon as it is
        # replaced, and none is still held when check_no_stale_o_proj runs.
        name, layer_idx, old = sites.pop(0)
        new = flashcomm2_o_proj_for(old, cfg, name)
        if replace_module(model, old, new) == 0:
            raise RuntimeError(f"could not place the FlashComm2 o_proj at {name}")
        if isinstance(state.series, TPShardStorage):
            state.series.add_layer(new, old, layer_idx)
            kept_by[name] = new
        elif state.series is not None:
            # Registered right away, so a non-owned layer's full weight is
            # released before the next layer's is allocated.
            join_series(new, old, cfg, state.series, layer_idx, dp_lockstep)
            if resident_slice_of(new) is not None:
                kept_by[name] = new
        elif cfg.adaptive_tokens:
            # FlashComm2 alone: plain TP's o_proj for the small side, contiguous
            # and in its own kernel's format (W/P more per layer).
            attach_resident_slice(new, old)
            kept_by[name] = new
        state.o_proj_prefixes.append(name)
        state.runtimes.append(new.runtime)
        replaced[name] = weakref.ref(old)
        del old
    check_no_stale_o_proj(replaced, kept_by)

    atexit.register(state.close)
    if not state.o_proj_prefixes:
        logger.warning("FlashComm2 is on but this pipeline stage has no hidden-layer o_proj.")
    logger.info(
        "[vllm_ascend_ext] FlashComm2 o_proj installed on %d layers (o_proj TP size %d, "
        "o_shared %s, prefetch step %d, plain row-parallel at <= %d tokens%s)",
        len(state.o_proj_prefixes), cfg.parallel_size,
        f"on, {state.storage} storage" if state.storage else "off",
        cfg.prefetch_step, cfg.adaptive_tokens,
        f"; plain TP's o_proj kept on {len(kept_by)} layers: small passes run it, with "
        "no FlashComm2 collective and no o_shared transfer" if kept_by else "",
    )
    return state


def _create_oshared_store(state: FlashComm2ModelState, cfg, first_o_proj: nn.Module,
                          name: str) -> None:
    """Choose o_shared's storage (``oshared_storage.choose_storage``) from the
    layout and the first o_proj's quant method, and create its store."""
    from vllm.distributed import get_tp_group

    from vllm_ascend_ext.config import FlashComm2ConfigError
    from vllm_ascend_ext.distributed.parallel_state import (
        get_flashcomm2_odp_group,
        get_flashcomm2_oshared_group,
    )
    from vllm_ascend_ext.oshared_storage import TP_SHARD, choose_storage
    from vllm_ascend_ext.ops.tp_shard.specs import shard_specs_for

    specs = shard_specs_for(first_o_proj)
    method = first_o_proj.quant_method
    method_name = type(getattr(method, "quant_method", None) or method).__name__
    oshared_group = get_flashcomm2_oshared_group()
    try:
        choice = choose_storage(
            cfg.oshared_storage, adaptive_tokens=cfg.adaptive_tokens,
            oshared_group_size=oshared_group.world_size,
            tp_size=get_tp_group().world_size,
            gather_spec=None if specs is None else specs.declared_by,
            quant_method=method_name)
    except ValueError as e:
        label = cfg.labels.get("oshared_storage", "oshared_storage")
        raise FlashComm2ConfigError(
            f"{label}={cfg.raw_values.get('oshared_storage', cfg.oshared_storage)!r} is "
            f"invalid: {e}; use round_robin or auto") from None
    state.storage, state.storage_reason = choice.storage, choice.reason
    logger.info("o_shared storage: %s (%s)", choice.storage, choice.reason)
    if choice.storage == TP_SHARD:
        from vllm_ascend_ext.ops.tp_shard.storage import TPShardStorage

        state.series = TPShardStorage(name, get_flashcomm2_odp_group(), cfg.prefetch_step, specs)
    else:
        from vllm_ascend_ext.ops.shared_weight.series import SharedWeightSeries

        state.series = SharedWeightSeries(name=name, group=oshared_group,
                                          prefetch_step=cfg.prefetch_step)


def flashcomm2_o_proj_for(old: nn.Module, cfg, name: str) -> nn.Module:
    """The FlashComm2 o_proj that replaces vLLM's ``old`` (not yet loaded)."""
    from vllm_ascend_ext.ops.flashcomm2_oproj import FlashComm2RowParallelLinear

    return FlashComm2RowParallelLinear(
        input_size=old.input_size,
        output_size=old.output_size,
        bias=old.bias is not None,
        skip_bias_add=old.skip_bias_add,
        params_dtype=old.params_dtype,
        quant_config=old.quant_config,
        prefix=old.prefix or name,
        return_bias=old.return_bias,
        int8_all_to_all=cfg.int8_all_to_all,
        adaptive_tokens=cfg.adaptive_tokens,
    )


def join_series(new: nn.Module, old: nn.Module, cfg, series, layer_idx: int,
                dp_lockstep: bool = False) -> None:
    """Register ``new`` in the o_shared ``series``; under the adaptive switch
    keep vLLM's ``old`` o_proj as its resident slice, so that small passes
    run plain TP's own layer and never read the ring."""
    series.add_layer(new, layer_idx)
    if cfg.adaptive_tokens:
        from vllm_ascend_ext.ops.resident_slice import attach_resident_slice

        attach_resident_slice(new, old)
        # Every member of the group must take one side per pass.
        new.adaptive_dp_wide = dp_lockstep


class FlashComm2ModelMixin:
    """Mixed in front of a vLLM ``*ForCausalLM``: build vLLM's model, then
    install FlashComm2 when the flags ask for it."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.flashcomm2 = install_flashcomm2(self, vllm_config)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if loaded is not None and self.flashcomm2 is not None:
            from vllm_ascend_ext.ops.resident_slice import resident_slice_param_names

            # Resident slices load from their layer's checkpoint tensors
            # (through its weight loaders), never under names of their own.
            loaded = set(loaded) | resident_slice_param_names(self)
        return loaded
