"""Read, from inside a running vLLM worker, what the o_proj weights really hold.

Used through ``LLM.collective_rpc(oproj_memory)``: every worker sums the bytes
of the distinct storages behind its hidden layers' o_proj parameters (so a ring
slot shared by several layers counts once), and returns them with the o_shared
series' own report for comparison.
"""

from __future__ import annotations

from dataclasses import asdict


def _model_of(worker):
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _add_storages(seen: dict[int, int], module, recurse: bool) -> None:
    """Record each distinct storage behind ``module``'s tensors (pointer -> bytes)."""
    for t in list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse)):
        st = t.untyped_storage()
        if st.nbytes():
            seen[st.data_ptr()] = st.nbytes()


def count_adaptive_sides(worker) -> int:
    """Start counting, on every adaptive o_proj of the worker's model, the
    calls per side of the switch (``ops/side_counter.py``; run it before the
    requests to count, :func:`oproj_memory` reports the counts). Returns how
    many layers count."""
    from vllm_ascend_ext.ops.side_counter import count_sides

    layers = [m for m in _model_of(worker).modules() if getattr(m, "adaptive_tokens", 0)]
    for layer in layers:
        count_sides(layer)
    return len(layers)


def oproj_memory(worker) -> dict:
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.models.utils import extract_layer_index

    model = _model_of(worker)
    hf_config = model.config if hasattr(model, "config") else None
    num_hidden = getattr(hf_config, "num_hidden_layers", 1 << 30)
    storages: dict[int, int] = {}
    all_storages: dict[int, int] = {}
    classes: set[str] = set()
    layers = 0
    # Per o_proj: the route of its int8 all-to-all, "off" where it sends the
    # activation dtype (ops/int8_all_to_all.py).
    a2a_routes: list[str] = []
    # Adaptive FlashComm2: forward calls per side (None unless counting was
    # asked for before the requests: ops/side_counter.py), and how many
    # layers keep plain TP's o_proj for the small side (ops/resident_slice.py).
    adaptive = {"flashcomm2_calls": None, "row_parallel_calls": None,
                "layers_with_resident_slice": 0}
    # o_shared's resident row-parallel slices (ops/resident_slice.py), in
    # bytes as loaded (vLLM CPU packs them into handles no tensor shows).
    slice_bytes = 0
    for name, module in model.named_modules():
        if not name.endswith("self_attn.o_proj") or not isinstance(module, LinearBase):
            continue
        if extract_layer_index(name) >= num_hidden:
            continue
        layers += 1
        classes.add(type(module).__name__)
        int8_in = module.int8_input() if hasattr(module, "int8_input") else None
        a2a_routes.append("off" if int8_in is None else int8_in.route)
        if getattr(module, "adaptive_tokens", 0):
            from vllm_ascend_ext.ops.resident_slice import resident_slice_of
            from vllm_ascend_ext.ops.side_counter import side_counts

            counts = side_counts(module)
            if counts is not None:
                for key, n in (("flashcomm2_calls", counts.flashcomm2),
                               ("row_parallel_calls", counts.row_parallel)):
                    adaptive[key] = (adaptive[key] or 0) + n
            adaptive["layers_with_resident_slice"] += resident_slice_of(module) is not None
        from vllm_ascend_ext.ops.resident_slice import resident_slice_bytes

        slice_bytes += resident_slice_bytes(module)
        _add_storages(storages, module, recurse=False)
        # Everything the layer holds, its slice included (a oneDNN handle shows
        # no storage, so this is exact only where the slice stays a tensor:
        # TP-shard storage).
        _add_storages(all_storages, module, recurse=True)
    # Attention impls that keep a private o_proj (vllm-ascend's AscendMLAImpl):
    # each must hold one of the model's live o_proj modules.
    live = {id(m) for name, m in model.named_modules() if name.endswith("self_attn.o_proj")}
    impl_classes: list[str] = []
    impl_stale = 0
    for module in model.modules():
        impl = module.__dict__.get("impl")
        held = getattr(impl, "o_proj", None) if impl is not None else None
        if held is not None:
            impl_classes.append(type(held).__name__)
            impl_stale += id(held) not in live
    state = getattr(model, "flashcomm2", None)
    series = getattr(state, "series", None)
    # A speculative draft (DeepSeek's MTP layer) is a model of its own, built
    # by vLLM's proposer: it must keep vLLM's o_proj and stay out of the series.
    draft = getattr(getattr(worker.model_runner, "drafter", None), "model", None)
    draft_classes = sorted({type(m).__name__ for name, m in draft.named_modules()
                            if name.endswith("o_proj")}) if draft is not None else []
    return {
        "draft_model_class": None if draft is None else type(draft).__name__,
        "draft_o_proj_classes": draft_classes,
        "series_layers": None if series is None else series.layer_indices,
        "impl_o_proj_classes": sorted(set(impl_classes)),
        "impl_o_proj_count": len(impl_classes),
        "impl_o_proj_stale": impl_stale,
        "o_proj_layers": layers,
        "o_proj_storage_bytes": sum(storages.values()),
        "o_proj_total_bytes": sum(all_storages.values()),
        "oshared_storage": getattr(state, "storage", None),
        "o_proj_resident_slice_bytes": slice_bytes,
        "o_proj_classes": sorted(classes),
        "int8_all_to_all_routes": sorted(set(a2a_routes)),
        "adaptive": adaptive,
        "series_report": None if series is None else asdict(series.memory_report()),
    }
