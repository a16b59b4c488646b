"""``SharedWeightSeries``: isomorphic layers stored round-robin across a group.

A series is a list of layers with identical parameter layouts (typically
every hidden layer's ``o_proj``). Instead of every rank of a vLLM
``GroupCoordinator`` holding all ``L`` copies, layer ``layer_idx`` is owned by
group rank ``layer_idx % n`` (:mod:`.ring_index`), and the other ranks receive
it just in time, by an asynchronous broadcast into a small static ring
(:mod:`.ring`). Over ``L`` consecutive indices every rank owns ``ceil(L/n)``
or ``floor(L/n)`` layers.

This class is the lifecycle: register members before loading
(:mod:`.members`), finalise once, collectively (:mod:`.materialise`; how a
processed layer is held in a buffer is ``ops/slot_storage.py``), run the hooks
(:mod:`.hook_ops`), report memory (:mod:`.report`), close. Finalisation runs
from vLLM's ordinary ``process_weights_after_loading`` pass: the first member
it reaches finalises the whole series, the others become no-ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vllm_ascend_ext.logger import init_logger
from vllm_ascend_ext.ops.shared_weight import hook_ops  # noqa: F401  (registers the ops)
from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError
from vllm_ascend_ext.ops.shared_weight.materialise import bind_to_buffer, materialise
from vllm_ascend_ext.ops.shared_weight.members import (
    SeriesMember,
    drop_unowned_storage,
    install_forward_wrapper,
    layer_name,
    new_member,
    read_layer_index,
)
from vllm_ascend_ext.ops.shared_weight.registry import (
    SharedWeightRegistry,
    shared_weight_registry,
)
from vllm_ascend_ext.ops.shared_weight.report import SharedWeightMemoryReport
from vllm_ascend_ext.ops.shared_weight.ring import SlotRing
from vllm_ascend_ext.ops.ring_counters import ring_counter
from vllm_ascend_ext.ops.shared_weight.ring_index import owner_of_layer_idx
from vllm_ascend_ext.ops.slot_storage import (
    LayerState,
    SlotBuffer,
    SlotFormat,
    SlotFormatError,
    TensorLayout,
    slot_format_for,
)

logger = init_logger(__name__)

__all__ = ["SharedWeightSeries"]


class SharedWeightSeries:
    """Round-robin storage of isomorphic layers over a vLLM ``GroupCoordinator``.

    Lifecycle: construct (registers the name), :meth:`add_layer` every member
    before weights load, let vLLM's ``process_weights_after_loading`` pass
    call :meth:`finalize` (or call it yourself, collectively), run forwards,
    :meth:`close`.
    """

    #: A slot holds every processed tensor of a layer (bias and scales too).
    holds_whole_layer = True

    def __init__(
        self,
        name: str,
        group: Any,
        prefetch_step: int = 1,
        *,
        registry: SharedWeightRegistry | None = None,
        slot_format: SlotFormat | None = None,
    ) -> None:
        if not isinstance(prefetch_step, int) or prefetch_step < 0:
            raise SharedWeightError(
                f"series {name!r}: prefetch_step must be an integer >= 0, "
                f"got {prefetch_step!r}"
            )
        self.name = name
        self.group = group
        self.prefetch_step = prefetch_step
        self.world_size: int = group.world_size
        self.rank_in_group: int = group.rank_in_group
        self._registry = registry if registry is not None else shared_weight_registry
        self._members: list[SeriesMember] = []
        self._by_idx: dict[int, SeriesMember] = {}
        self._finalized = False
        self._closed = False
        self.start_layer: int | None = None
        self.num_layers = 0
        self._layouts: tuple[TensorLayout, ...] = ()
        # How a processed layer is held: chosen from its device at finalisation
        # (slot_storage.slot_format_for) unless given.
        self.slot_format: SlotFormat | None = slot_format
        self.per_layer_bytes = 0
        self.ring: SlotRing | None = None  # built at finalisation
        self._registry.register(self)

    # ---------------------------------------------------------------- info

    @property
    def finalized(self) -> bool:
        return self._finalized

    @property
    def layers(self) -> list[nn.Module]:
        """Members in position order (registration order before finalisation)."""
        return [m.layer for m in self._members]

    @property
    def layer_indices(self) -> list[int]:
        """The members' model layer indices, in position order once finalised."""
        return [m.layer_idx for m in self._members]

    @property
    def layouts(self) -> tuple[TensorLayout, ...]:
        """One processed layer's tensor layouts (every member has the same)."""
        return self._layouts

    num_waits = ring_counter("num_waits")
    num_prefetches = ring_counter("num_prefetches")
    num_broadcasts = ring_counter("num_broadcasts")

    def owner_of_layer_idx(self, layer_idx: int) -> int:
        """Group rank that owns (stores and broadcasts) layer ``layer_idx``."""
        return owner_of_layer_idx(layer_idx, self.world_size)

    def owner_of_position(self, position: int) -> int:
        if self.start_layer is None:
            raise SharedWeightError(f"series {self.name!r} is not finalised yet")
        return self.owner_of_layer_idx(self.start_layer + position)

    def owns_position(self, position: int) -> bool:
        return self.owner_of_position(position) == self.rank_in_group

    def position_of(self, layer_or_position: nn.Module | int) -> int:
        if isinstance(layer_or_position, int):
            position = layer_or_position
        else:
            if getattr(layer_or_position, "shared_weight_series", None) is not self:
                raise SharedWeightError(
                    f"layer {layer_name(layer_or_position)!r} is not a member of "
                    f"series {self.name!r}"
                )
            position = layer_or_position.shared_weight_position
        self._check_position(position)
        return position

    # -------------------------------------------------------- registration

    def add_layer(self, layer: nn.Module, layer_idx: int | None = None) -> None:
        """Register ``layer`` (before its weights are loaded)."""
        name = layer_name(layer)
        if self._closed:
            raise SharedWeightError(f"series {self.name!r} is closed; cannot add {name!r}")
        if self._finalized:
            raise SharedWeightError(
                f"cannot add layer {name!r} to series {self.name!r}: the series "
                "is already finalised (registration must happen before loading)"
            )
        current = getattr(layer, "shared_weight_series", None)
        if current is not None:
            raise SharedWeightError(
                f"layer {name!r} is already registered in series {current.name!r}; "
                "a layer can join one series once"
            )
        if layer_idx is None:
            layer_idx = read_layer_index(layer)
        if layer_idx in self._by_idx:
            raise SharedWeightError(
                f"layer {name!r}: series {self.name!r} already has a layer with "
                f"index {layer_idx} ({layer_name(self._by_idx[layer_idx].layer)!r})"
            )
        first = self._members[0] if self._members else None
        member = new_member(self.name, layer, layer_idx, first)
        if self.owner_of_layer_idx(layer_idx) != self.rank_in_group:
            drop_unowned_storage(member)
        layer.shared_weight_series = self
        layer.shared_weight_position = None
        if getattr(type(layer), "places_shared_weight_hooks", False):
            # A FlashComm2 o_proj: its forward waits and prefetches through
            # its runtime record (ops/oproj_runtime.py), bound at finalisation.
            layer.runtime.join_store(self)
        else:
            install_forward_wrapper(self, member)
        self._members.append(member)
        self._by_idx[layer_idx] = member

    # -------------------------------------------------------- finalisation

    def finalize(self) -> None:
        """Collective, once: distribute, post-process and pack every member."""
        if self._finalized:
            return
        if self._closed:
            raise SharedWeightError(f"series {self.name!r} is closed")
        if not self._members:
            raise SharedWeightError(f"series {self.name!r} has no layers")
        members = sorted(self._members, key=lambda m: m.layer_idx)
        start = members[0].layer_idx
        for p, m in enumerate(members):
            if m.layer_idx != start + p:
                got = [x.layer_idx for x in members]
                raise SharedWeightError(
                    f"series {self.name!r}: layer indices must be consecutive, got "
                    f"{got} (layer {layer_name(m.layer)!r} has index {m.layer_idx}, "
                    f"expected {start + p})"
                )
        L, k = len(members), self.prefetch_step
        if not 0 <= k <= L - 1:
            raise SharedWeightError(
                f"series {self.name!r}: prefetch_step must be in [0, {L - 1}] for "
                f"{L} layers, got {k}"
            )
        self._members = members
        self.start_layer, self.num_layers = start, L
        for p, m in enumerate(members):
            m.position = p

        ring = self.ring = SlotRing(self.name, self.group, k, start, L)
        for p, m in enumerate(members):
            src = self.group.ranks[self.owner_of_position(p)] if self.world_size > 1 else None
            state = materialise(m, owned=self.owns_position(p), src=src,
                                device_group=self.group.device_group)
            if self.slot_format is None:
                self.slot_format = slot_format_for(state)
            self._check_layout(m, state, members[0])
            if p == 0:
                self.per_layer_bytes = self.slot_format.buffer_bytes(self._layouts, state)
                ring.allocate_slots(lambda: self._new_buffer(state))
            buf, fill = ring.buffer_for(p, lambda: self._new_buffer(state))
            if fill:
                self.slot_format.fill(buf, state)
            bind_to_buffer(m.layer, buf, state)
            m.layer.shared_weight_position = p
            if getattr(type(m.layer), "places_shared_weight_hooks", False):
                m.layer.runtime.bind(ring, p)
            m.raw = []
        ring.start_filled()
        self._finalized = True
        report = self.memory_report()
        logger.info(
            "o_shared series %r: %d layers (%d..%d) over %d ranks, prefetch_step=%d; "
            "replicated %.2f MiB, o_shared %.2f MiB (%d owned + %d slots), "
            "floor %.2f MiB",
            self.name, L, start, start + L - 1, self.world_size, k,
            report.mib(report.replicated_bytes), report.mib(report.resident_bytes),
            report.owned_layers, report.slots, report.mib(report.floor_bytes),
        )

    def _check_layout(self, m: SeriesMember, state: LayerState,
                      first: SeriesMember) -> None:
        """The first member sets the layout; every later one must match it."""
        try:
            layouts = self.slot_format.plan(state)
        except SlotFormatError as e:
            raise SharedWeightError(f"layer {layer_name(m.layer)!r}: {e}") from e
        if m is first:
            self._layouts = layouts
        elif [lay.signature() for lay in layouts] != [
            lay.signature() for lay in self._layouts
        ]:
            raise SharedWeightError(
                f"series {self.name!r}: layer {layer_name(m.layer)!r} has a "
                "different processed layout (name, kind, dtype, shape, stride) "
                f"than {layer_name(first.layer)!r}: "
                f"{[lay.signature() for lay in layouts]} vs "
                f"{[lay.signature() for lay in self._layouts]}"
            )

    def _new_buffer(self, state: LayerState) -> SlotBuffer:
        try:
            return self.slot_format.new_buffer(self._layouts, state)
        except SlotFormatError as e:
            raise SharedWeightError(f"series {self.name!r}: {e}") from e

    # ------------------------------------------------------------- runtime

    def wait(self, layer_or_position: nn.Module | int, anchor: torch.Tensor) -> None:
        """Before the matmul: make the layer's weights present (op on ``anchor``)."""
        position = self.position_of(layer_or_position)
        torch.ops.vllm_ascend_ext.shared_weight_wait(anchor, self.name, position)

    def prefetch_after(
        self, layer_or_position: nn.Module | int, anchor: torch.Tensor
    ) -> None:
        """After the matmul: refill the layer's slot with its next user."""
        position = self.position_of(layer_or_position)
        torch.ops.vllm_ascend_ext.shared_weight_prefetch(anchor, self.name, position)

    def ring_for(self, position: int) -> SlotRing:
        """The ring, once ``position`` is checked (the custom ops' entry)."""
        self._check_position(position)
        return self.ring

    def _check_position(self, position: int) -> None:
        if not self._finalized:
            raise SharedWeightError(
                f"series {self.name!r} is not finalised: run the model's "
                "process_weights_after_loading (or finalize()) before any forward"
            )
        if not 0 <= position < self.num_layers:
            raise SharedWeightError(
                f"series {self.name!r}: position {position} outside [0, {self.num_layers})"
            )

    def synchronize(self) -> None:
        """Wait for every outstanding broadcast of this series."""
        if self.ring is not None:
            self.ring.synchronize()

    # -------------------------------------------------------------- report

    def memory_report(self) -> SharedWeightMemoryReport:
        if not self._finalized:
            raise SharedWeightError(f"series {self.name!r} is not finalised")
        per, L, n, ring = self.per_layer_bytes, self.num_layers, self.world_size, self.ring
        return SharedWeightMemoryReport(
            num_layers=L, world_size=n, prefetch_step=self.prefetch_step,
            per_layer_bytes=per, owned_layers=len(ring.resident),
            slots=len(ring.slots), resident_bytes=ring.resident_bytes,
            replicated_bytes=L * per, floor_bytes=L * per / n,
        )

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Wait outstanding broadcasts and unregister the series' name."""
        if self._closed:
            return
        try:
            self.synchronize()
        finally:
            self._closed = True
            for m in self._members:
                if getattr(type(m.layer), "places_shared_weight_hooks", False):
                    m.layer.runtime.release()
            if self._registry.find(self.name) is self:
                self._registry.unregister(self.name)

    def __repr__(self) -> str:
        return (
            f"SharedWeightSeries({self.name!r}, n={self.world_size}, "
            f"rank={self.rank_in_group}, k={self.prefetch_step}, "
            f"layers={[m.layer_idx for m in self._members]}, "
            f"finalized={self._finalized})"
        )
