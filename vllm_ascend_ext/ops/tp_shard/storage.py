"""o_shared on TP shards: every rank keeps plain TP's o_proj, FlashComm2 gathers the rest.

Each FlashComm2 o_proj keeps vLLM's own row-parallel o_proj of the same layer
(``RowParallelLinear``; ``AscendRowParallelLinear`` on Ascend) as its
resident slice (``ops/resident_slice.py``): loaded by its own weight loader
from the checkpoint tensor, post-processed by its own quant method. That is
all a rank stores per layer. The FlashComm2 layer's own parameters hold no
storage of their own.

- A step at or below the adaptive threshold runs the slice: plain TP, no
  ring, no collective beyond plain TP's all-reduce.
- A larger step runs FlashComm2 on the ODP group's shards gathered into a
  ring slot (``ring.py``), ``prefetch_step`` layers ahead: binding puts the
  ring and the layer's position into the layer's runtime record
  (``ops/oproj_runtime.py``), whose ops wait and prefetch. The matmul runs
  through an *OTP view* of the slice: the same module state (quant method,
  kernel, scales, bias) with the sharded attributes pointing at the slot and
  its TP attributes (``tp_rank``, ``tp_size``, ``input_size_per_partition``)
  set to the OTP ones, as the FlashComm2 layer's own are.

Bytes per rank: ``L * W / P`` (plain TP's) plus one gathered weight
(``W * k / P`` ... ``W``) per ring slot.

Loading: vLLM's post-load pass visits each FlashComm2 layer, then its slice
(parents first). The first of the two visits runs the slice's quant method (on
vLLM CPU keeping the weight a plain tensor, which is the same bytes) and binds
the layer to its slot; the second does nothing. The first ``k`` layers are
gathered into the ring right there, on every rank in the same order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from vllm_ascend_ext.logger import init_logger
from vllm_ascend_ext.ops.flashcomm2_oproj import OTP_VIEW_ATTR
from vllm_ascend_ext.ops.resident_slice import attach_resident_slice, resident_slice_of
from vllm_ascend_ext.ops.ring_counters import ring_counter
from vllm_ascend_ext.ops.tp_shard.ring import GatherRing, ShardSource
from vllm_ascend_ext.ops.tp_shard.specs import ShardSpecs

logger = init_logger(__name__)

__all__ = ["TPShardMemoryReport", "TPShardStorage", "close_all"]

#: Every live storage, for close_all (a test world reused for the next case).
_LIVE: list[TPShardStorage] = []


def _skip_loading(*args: Any, **kwargs: Any) -> None:
    return None


def _storage_bytes(module: nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class TPShardMemoryReport:
    """What one rank holds for a stage's o_proj under TP-shard storage."""

    num_layers: int
    group_size: int  # ODP size D: how many shards one gathered weight joins
    prefetch_step: int
    slots: int
    shard_bytes: int  # plain TP's o_proj, every layer, as processed
    slot_bytes: int  # the ring
    gathered_bytes_per_layer: int  # one slot's gathered tensors

    @property
    def total_bytes(self) -> int:
        return self.shard_bytes + self.slot_bytes

    @property
    def received_bytes_per_layer(self) -> int:
        """Bytes a rank receives per layer per FlashComm2 step: (D-1)/D of it."""
        return self.gathered_bytes_per_layer * (self.group_size - 1) // self.group_size


class TPShardStorage:
    """One pipeline stage's o_proj layers on TP shards, and their gather ring.

    Lifecycle: :meth:`add_layer` for every layer before loading; vLLM's
    post-load pass binds each into its runtime record (the ring and its
    position), which FlashComm2's matmul waits on and prefetches through;
    :meth:`close`.
    """

    #: Only the sharded attributes live in the ring (the bias and scales are
    #: the slice's own), so a caller needs no private copy of the bias.
    holds_whole_layer = False

    def __init__(self, name: str, odp_group: Any, prefetch_step: int, specs: ShardSpecs) -> None:
        self.name = name
        self.group = odp_group
        self.prefetch_step = prefetch_step
        self.specs = specs
        self._by_idx: dict[int, nn.Module] = {}  # layer index -> FlashComm2 layer
        self.start_layer: int | None = None
        self.ring: GatherRing | None = None
        self._bound = 0
        _LIVE.append(self)

    # -------------------------------------------------------- registration

    def add_layer(self, layer: nn.Module, row_parallel: nn.Module, layer_idx: int) -> None:
        """Before loading: ``row_parallel`` (vLLM's o_proj of this layer)
        becomes the layer's storage; the layer's own parameters hold none."""
        if layer_idx in self._by_idx:
            raise ValueError(f"o_shared {self.name!r}: layer {layer_idx} added twice")
        for param in layer.parameters(recurse=False):
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            param.weight_loader = _skip_loading
        attach_resident_slice(layer, row_parallel)  # its loaders now feed the slice
        post = _plain_post_load(row_parallel, layer.prefix)

        def finish(module: nn.Module) -> None:
            # Whichever of the two vLLM's pass reaches first (parents come
            # first; a caller may process only the layer): once. The slice is
            # looked up, not captured: the install's stale-reference check
            # must find the layer as its only holder.
            if layer.runtime.position < 0:
                post(resident_slice_of(layer))
                self._bind(layer, layer_idx)

        _run_post_load_as(layer, finish)
        _run_post_load_as(row_parallel, finish)
        layer.runtime.join_store(self)
        layer.adaptive_dp_wide = False  # the gathers stay inside one TP group
        self._by_idx[layer_idx] = layer

    # ------------------------------------------------------------- binding

    def _bind(self, layer: nn.Module, layer_idx: int) -> None:
        if self.ring is None:
            self._start()
        position = layer_idx - self.start_layer
        row_parallel = resident_slice_of(layer)
        shards = {}
        for spec in self.specs.gathered:
            shard = getattr(row_parallel, spec.attr, None)
            if not isinstance(shard, torch.Tensor) or shard.numel() == 0:
                raise RuntimeError(
                    f"{layer.prefix!r}: {self.specs.declared_by} names {spec.attr!r}, but "
                    f"after post-processing {type(row_parallel).__name__} holds "
                    f"{type(shard).__name__} there, not a tensor to gather")
            shards[spec.attr] = shard
        slot = self.ring.add_source(position, ShardSource(shards))
        view = _otp_view(layer, row_parallel, slot, self.specs, self.group.world_size)
        layer.__dict__[OTP_VIEW_ATTR] = view
        for name, param in layer.named_parameters(recurse=False):
            src = slot.get(name)
            if src is None:
                src = getattr(row_parallel, name, None)
            if isinstance(src, torch.Tensor):
                param.data = src.detach()  # shares storage: no bytes of its own
        layer.runtime.bind(self.ring, position)
        self._bound += 1
        if self._bound == len(self._by_idx):
            self._log()

    def _start(self) -> None:
        indices = sorted(self._by_idx)
        start = indices[0]
        if indices != list(range(start, start + len(indices))):
            raise ValueError(f"o_shared {self.name!r}: layer indices {indices} are not consecutive")
        L, k = len(indices), self.prefetch_step
        if not 0 <= k <= max(L - 1, 0):
            raise ValueError(f"o_shared {self.name!r}: prefetch step {k} is outside [0, {L - 1}]")
        self.start_layer = start
        self.ring = GatherRing(self.name, self.group, k, L,
                               {s.attr: s.dim for s in self.specs.gathered})

    # ------------------------------------------------------------- runtime

    def synchronize(self) -> None:
        if self.ring is not None:
            self.ring.synchronize()

    def close(self) -> None:
        try:
            self.synchronize()
        finally:
            for layer in self._by_idx.values():
                layer.runtime.release()
            if self in _LIVE:
                _LIVE.remove(self)

    @property
    def layer_indices(self) -> list[int]:
        return sorted(self._by_idx)

    @property
    def layers(self) -> list[nn.Module]:
        """The FlashComm2 layers in layer order."""
        return [self._by_idx[i] for i in sorted(self._by_idx)]

    num_waits = ring_counter("num_waits")
    num_prefetches = ring_counter("num_prefetches")
    num_gathers = ring_counter("num_gathers")

    # -------------------------------------------------------------- report

    def memory_report(self) -> TPShardMemoryReport:
        if self.ring is None or self._bound < len(self._by_idx):
            raise RuntimeError(f"o_shared {self.name!r} is not loaded yet")
        slot = self.ring.slots[0]
        return TPShardMemoryReport(
            num_layers=len(self._by_idx), group_size=self.group.world_size,
            prefetch_step=self.prefetch_step, slots=len(self.ring.slots),
            shard_bytes=sum(_storage_bytes(resident_slice_of(m)) for m in self._by_idx.values()),
            slot_bytes=self.ring.slot_bytes,
            gathered_bytes_per_layer=sum(t.untyped_storage().nbytes() for t in slot.values()))

    def _log(self) -> None:
        r = self.memory_report()
        mib = 1 << 20
        logger.info(
            "o_shared %r: TP-shard storage, %d layers (%d..%d), %s; per rank: plain TP's "
            "o_proj %.2f MiB + %d ring slot(s) %.2f MiB = %.2f MiB; a FlashComm2 step "
            "gathers %.2f MiB per layer over %d ranks (receives %.2f MiB)",
            self.name, r.num_layers, self.start_layer, self.start_layer + r.num_layers - 1,
            self.specs.declared_by, r.shard_bytes / mib, r.slots, r.slot_bytes / mib,
            r.total_bytes / mib, r.gathered_bytes_per_layer / mib, r.group_size,
            r.received_bytes_per_layer / mib)


def close_all() -> None:
    """Close every live storage (a test world reused for the next call)."""
    for storage in list(_LIVE):
        storage.close()
    _LIVE.clear()


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _run_post_load_as(module: nn.Module, step: Callable[[nn.Module], Any]) -> None:
    """vLLM's post-load pass calls ``module.quant_method.process_weights_after_loading
    (module)``; make that call run ``step`` for this module. The method object
    may be shared with other layers, so the choice is made per module."""
    method = module.quant_method
    current = method.process_weights_after_loading
    if not getattr(current, "_tp_shard_dispatch", False):
        original = current

        def process_weights_after_loading(mod: nn.Module) -> None:
            own = mod.__dict__.get("_tp_shard_post_load")
            (own or original)(mod)

        process_weights_after_loading._tp_shard_dispatch = True
        process_weights_after_loading._tp_shard_original = original
        method.process_weights_after_loading = process_weights_after_loading
    module.__dict__["_tp_shard_post_load"] = step


def _plain_post_load(row_parallel: nn.Module, name: str) -> Callable[[nn.Module], None]:
    """The slice's own post-load step; on vLLM CPU one that keeps the weight a
    plain tensor (the same bytes; a oneDNN handle cannot be gathered)."""
    post = row_parallel.quant_method.process_weights_after_loading
    post = getattr(post, "_tp_shard_original", post)  # a shared, already dispatched method
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return post
    from vllm_ascend_ext.compat import keep_cpu_linear_weight_plain
    from vllm_ascend_ext.ops.cpu_int8 import keep_int8_weight_plain

    post = keep_cpu_linear_weight_plain(row_parallel, post)
    return keep_int8_weight_plain(row_parallel, post, name)


def _set_tensor(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        module.__dict__[attr] = tensor


def _otp_view(layer: nn.Module, row_parallel: nn.Module, slot: dict[str, torch.Tensor],
              specs: ShardSpecs, group_size: int) -> nn.Module:
    """``row_parallel`` as FlashComm2 multiplies with it: its state, the
    gathered attributes from ``slot``, the repeated ones widened, and the OTP
    rank and size (what the quant method's rank-dependent terms read)."""
    view = copy.copy(row_parallel)
    view.__dict__["_parameters"] = dict(row_parallel._parameters)
    view.__dict__["_buffers"] = dict(row_parallel._buffers)
    view.__dict__["_modules"] = {}
    for attr, full in slot.items():
        _set_tensor(view, attr, full)
    for spec in specs.repeated:
        t = getattr(row_parallel, spec.attr)
        reps = [1] * t.dim()
        reps[spec.dim] = group_size
        _set_tensor(view, spec.attr, t.detach().repeat(*reps))
    view.__dict__["_tp_shard_post_load"] = None
    for attr in ("tp_rank", "tp_size", "input_size_per_partition", "otp_size"):
        view.__dict__[attr] = getattr(layer, attr)
    return view
