"""o_shared: a series of isomorphic linear layers stored round-robin across a group.

A *shared-weight series* is a list of layers with identical parameter layouts
(typically every hidden layer's ``o_proj``).  Instead of every rank of a
``GroupCoordinator`` holding all ``L`` copies, each layer is *owned* by exactly
one group rank, and the other ranks receive it just in time through an
asynchronous ``torch.distributed.broadcast`` into a small static ring.

Ownership
    Layers are indexed by their model layer index ``layer_idx`` (from the
    module prefix) and by their *position* ``p = layer_idx - start_layer`` in
    the series.  The owner of a layer is group rank ``layer_idx % n``
    (equivalently ``(start_layer + p) % n``).  The rule uses only the layer's
    own index, so a rank can decide at registration time -- before
    ``start_layer`` is known -- which layers it will never load.  Over ``L``
    consecutive indices every rank owns ``ceil(L/n)`` or ``floor(L/n)`` layers.
    All ring arithmetic (slots, next prefetch target) uses positions, so a
    series may start at any layer index (later pipeline stages included).

What the ring holds
    Each slot holds one layer's *post-processed* parameter and buffer
    tensors -- the exact tensors the layer's own ``quant_method.apply``
    consumes: raw weights on CPU/CUDA, NZ-cast weights on Ascend, the
    quantized weight plus its scales for a quantized method.  Every rank runs
    the layer's original ``process_weights_after_loading`` on the broadcast
    raw weights once, at finalisation, so format casts and packing happen
    exactly as they would without sharing.  A quant method whose processed
    state is not a plain tensor cannot be shared: vLLM CPU's unquantized
    method packs the weight into an opaque oneDNN handle and leaves
    ``layer.weight`` empty, so registration sets vLLM's own escape hatch
    ``layer._cpu_skip_gemm_dispatch = True`` on CPU (the weight stays a plain
    tensor and the layer uses ``F.linear``), and vLLM CPU's int8 W8A8 kernel
    without AMX keeps a plain int8 weight (``cpu_int8.py``); any other method
    that leaves an empty weight is rejected with :class:`SharedWeightError`.

Buffers (``slot_storage.py``)
    How one processed layer is held is the platform's business: on CPU/CUDA
    its tensors are typed ``as_strided`` views of ONE flat ``uint8`` buffer
    (one broadcast per layer; transposed or padded layouts survive); on
    Ascend each tensor gets a buffer in its own storage format (NZ included)
    at its real storage size.  Owned layers live permanently in their own
    buffer; non-owned layers' parameters are permanently bound to their ring
    slot's tensors, so parameter objects never change identity or metadata
    (torch.compile sees stable tensors) and broadcasts only mutate contents.

Ring (prefetch step ``k``)
    ``k`` buffers, not ``k + 1``: position ``p`` uses slot ``p % k``.  Right
    after position ``p``'s matmul the slot is refilled with its next user
    ``q = p + k`` (or ``p % k`` of the next forward pass when ``p + k >= L``),
    see :func:`next_prefetch_position`.  A rank allocates only the slots it
    ever receives into, so resident memory is ``owned + used slots`` packed
    layers.  ``k = 0`` means a synchronous broadcast at use into one buffer.
    Every rank issues the same broadcast sequence (the owner of ``q`` sends
    from its resident buffer), so all ranks of the group must run the
    series' layers in the same order, as they do under TP.

Hooks
    Two custom ops in the ``vllm_ascend_ext`` namespace keep the order under
    torch.compile by declaring their anchor tensor mutated:
    ``shared_weight_wait(anchor, series_name, position)`` before the matmul
    (anchor = the layer input) and ``shared_weight_prefetch(anchor,
    series_name, position)`` after it (anchor = the layer output).  Plain
    linear layers get an instance-level forward wrapper at registration; a
    layer class that places the hooks itself (``places_shared_weight_hooks =
    True``) calls :meth:`SharedWeightSeries.wait` and
    :meth:`SharedWeightSeries.prefetch_after` around its own matmul.

Finalisation
    Runs once per series, collectively on every rank, from vLLM's ordinary
    ``process_weights_after_loading`` pass: registration overrides each
    member's ``quant_method.process_weights_after_loading`` (an instance
    attribute on that quant-method object) so the first member reached
    finalises the whole series and the others become no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from vllm_ascend_ext.logger import init_logger
from vllm_ascend_ext.ops.slot_storage import (
    PACK_ALIGN,
    SlotBuffer,
    SlotFormat,
    SlotFormatError,
    TensorLayout,
    round_up,
    slot_format_for,
)

logger = init_logger(__name__)

__all__ = [
    "PACK_ALIGN",
    "SharedWeightError",
    "SharedWeightMemoryReport",
    "SharedWeightRegistry",
    "SharedWeightSeries",
    "TensorLayout",
    "is_hidden_layer",
    "next_prefetch_position",
    "post_process_after_loading_for_shared_weight_series",
    "reach_layer_for_shared_weight_series",
    "register_layer_to_shared_weight_series",
    "shared_weight_registry",
    "slot_of_position",
]

_BYTE_DTYPE = torch.uint8


class SharedWeightError(ValueError):
    """A shared-weight series was used against its rules."""


# --------------------------------------------------------------------------
# pure index arithmetic (positions are relative to the series' first layer)
# --------------------------------------------------------------------------


def slot_of_position(position: int, prefetch_step: int) -> int:
    """Ring slot used by ``position`` (``k = 0`` has a single slot)."""
    return position % prefetch_step if prefetch_step > 0 else 0


def next_prefetch_position(
    position: int, prefetch_step: int, num_layers: int
) -> int | None:
    """Position whose weights refill slot ``position % k`` after ``position`` ran.

    The slot's next user is ``position + k`` while that is inside the series;
    past the end it is the slot's first user in the next forward pass,
    ``position % k``.  Staying inside the slot's residue class keeps the ring
    correct when ``num_layers % k != 0``.  ``k = 0`` prefetches nothing.
    """
    if not 0 <= position < num_layers:
        raise SharedWeightError(
            f"position {position} is outside a series of {num_layers} layers"
        )
    if prefetch_step == 0:
        return None
    nxt = position + prefetch_step
    return nxt if nxt < num_layers else position % prefetch_step


# --------------------------------------------------------------------------
# layouts and reports
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedWeightMemoryReport:
    """Bytes one rank spends on a series, next to full replication and the floor."""

    num_layers: int
    world_size: int
    prefetch_step: int
    per_layer_bytes: int  # one layer's buffer (= one slot), real storage bytes
    owned_layers: int
    slots: int  # ring buffers allocated on this rank
    resident_bytes: int  # owned packed layers + allocated slots
    replicated_bytes: int  # num_layers * per_layer_bytes
    floor_bytes: float  # num_layers * per_layer_bytes / world_size

    @staticmethod
    def mib(nbytes: float) -> float:
        return nbytes / (1 << 20)


@dataclass
class _RawParam:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass
class _Member:
    layer: nn.Module
    layer_idx: int
    post_method: Callable[[nn.Module], None]
    raw: list[_RawParam]
    position: int = -1


def _skip_loading(*args: Any, **kwargs: Any) -> None:
    """Weight loader of a parameter this rank does not own: load nothing."""
    return None


def _layer_name(layer: nn.Module) -> str:
    return getattr(layer, "prefix", "") or type(layer).__name__


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------


class SharedWeightRegistry:
    """Name -> series map the custom ops use to find a series from plain args."""

    def __init__(self) -> None:
        self._series: dict[str, SharedWeightSeries] = {}

    def register(self, series: SharedWeightSeries) -> None:
        if series.name in self._series:
            raise SharedWeightError(
                f"a shared-weight series named {series.name!r} is already "
                "registered; series names must be unique"
            )
        self._series[series.name] = series

    def unregister(self, name: str) -> None:
        self._series.pop(name, None)

    def get(self, name: str) -> SharedWeightSeries:
        try:
            return self._series[name]
        except KeyError:
            raise SharedWeightError(
                f"no shared-weight series named {name!r} is registered "
                "(closed, or never created)"
            ) from None

    def find(self, name: str) -> SharedWeightSeries | None:
        return self._series.get(name)

    def clear(self) -> None:
        for series in list(self._series.values()):
            series.close()
        self._series.clear()

    def names(self) -> list[str]:
        return list(self._series)

    def __contains__(self, name: object) -> bool:
        return name in self._series

    def __len__(self) -> int:
        return len(self._series)


#: The one registry the custom ops consult.
shared_weight_registry = SharedWeightRegistry()


# --------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------

_OP_NAMESPACE = "vllm_ascend_ext"
_lib = torch.library.Library(_OP_NAMESPACE, "FRAGMENT")  # noqa: TID251


def _shared_weight_wait(anchor: torch.Tensor, series_name: str, position: int) -> None:
    shared_weight_registry.get(series_name)._wait_position(position)


def _shared_weight_prefetch(
    anchor: torch.Tensor, series_name: str, position: int
) -> None:
    shared_weight_registry.get(series_name)._prefetch_after_position(position)


def _shared_weight_hook_fake(
    anchor: torch.Tensor, series_name: str, position: int
) -> None:
    return None


def _register_ops() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    ns = getattr(torch.ops, _OP_NAMESPACE)
    for name, impl in (
        ("shared_weight_wait", _shared_weight_wait),
        ("shared_weight_prefetch", _shared_weight_prefetch),
    ):
        if hasattr(ns, name):  # module re-imported: keep the first definition
            continue
        direct_register_custom_op(
            op_name=name,
            op_func=impl,
            mutates_args=["anchor"],
            fake_impl=_shared_weight_hook_fake,
            target_lib=_lib,
        )


_register_ops()


# --------------------------------------------------------------------------
# the series
# --------------------------------------------------------------------------


class SharedWeightSeries:
    """Round-robin storage of isomorphic layers over a vLLM ``GroupCoordinator``.

    Lifecycle: construct (registers the name), :meth:`add_layer` every member
    before weights load, let vLLM's ``process_weights_after_loading`` pass
    call :meth:`finalize` (or call it yourself, collectively), run forwards,
    :meth:`close`.
    """

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
        self._members: list[_Member] = []
        self._by_idx: dict[int, _Member] = {}
        self._finalized = False
        self._closed = False
        self.start_layer: int | None = None
        self.num_layers = 0
        self._layouts: tuple[TensorLayout, ...] = ()
        # How a processed layer is held: chosen from its device at finalisation
        # (slot_storage.slot_format_for) unless given.
        self.slot_format: SlotFormat | None = slot_format
        self.per_layer_bytes = 0
        self._resident: dict[int, SlotBuffer] = {}  # position -> its own buffer
        self._slots: dict[int, SlotBuffer] = {}  # slot -> buffer (used slots only)
        self._num_slot_records = 0
        self._slot_position: list[int] = []  # rank-independent: what each slot holds
        self._slot_work: list[Any] = []
        # runtime counters (what the ops actually did; cheap, for tests/benchmarks)
        self.num_waits = 0
        self.num_prefetches = 0
        self.num_broadcasts = 0
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

    def owner_of_layer_idx(self, layer_idx: int) -> int:
        """Group rank that owns (stores and broadcasts) layer ``layer_idx``."""
        return layer_idx % self.world_size

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
                    f"layer {_layer_name(layer_or_position)!r} is not a member of "
                    f"series {self.name!r}"
                )
            position = layer_or_position.shared_weight_position
        self._check_position(position)
        return position

    # -------------------------------------------------------- registration

    def add_layer(self, layer: nn.Module, layer_idx: int | None = None) -> None:
        """Register ``layer`` (before its weights are loaded)."""
        from vllm.model_executor.layers.quantization.base_config import (
            QuantizeMethodBase,
        )

        name = _layer_name(layer)
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
            layer_idx = self._extract_index(layer)
        if layer_idx in self._by_idx:
            raise SharedWeightError(
                f"layer {name!r}: series {self.name!r} already has a layer with "
                f"index {layer_idx} ({_layer_name(self._by_idx[layer_idx].layer)!r})"
            )
        quant_method = getattr(layer, "quant_method", None)
        if not isinstance(quant_method, QuantizeMethodBase):
            raise SharedWeightError(
                f"layer {name!r} has no vLLM quant_method; only vLLM linear "
                "layers can join a shared-weight series"
            )
        raw = [
            _RawParam(pname, tuple(p.shape), p.dtype, p.device)
            for pname, p in layer.named_parameters(recurse=False)
            if p.numel() > 0
        ]
        if not raw:
            raise SharedWeightError(f"layer {name!r} has no parameters to share")
        if self._members:
            ref = self._members[0]
            sig = [(r.name, r.shape, r.dtype) for r in raw]
            ref_sig = [(r.name, r.shape, r.dtype) for r in ref.raw]
            if sig != ref_sig:
                raise SharedWeightError(
                    f"layer {name!r} does not match series {self.name!r}: all "
                    "members must have identical parameters (name, shape, dtype); "
                    f"got {sig}, series has {ref_sig} (from {_layer_name(ref.layer)!r})"
                )

        post_method = self._hook_post_load(layer, quant_method)

        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # Keep the processed weight a plain tensor (see module docstring).
            from vllm_ascend_ext.compat import keep_cpu_linear_weight_plain

            post_method = keep_cpu_linear_weight_plain(layer, post_method)
            # W8A8 int8 without AMX: a plain int8 weight instead of a oneDNN handle.
            from vllm_ascend_ext.ops.cpu_int8 import keep_int8_weight_plain

            post_method = keep_int8_weight_plain(layer, post_method, name)
        member = _Member(layer, layer_idx, post_method, raw)

        if self.owner_of_layer_idx(layer_idx) != self.rank_in_group:
            # Not ours: drop the storage before loading and ignore the checkpoint.
            for r in raw:
                param = layer._parameters[r.name]
                param.data = torch.empty(0, dtype=r.dtype, device=r.device)
                param.weight_loader = _skip_loading

        layer.shared_weight_series = self
        layer.shared_weight_position = None
        if not getattr(type(layer), "places_shared_weight_hooks", False):
            self._install_forward_wrapper(layer, member)
        self._members.append(member)
        self._by_idx[layer_idx] = member

    def _extract_index(self, layer: nn.Module) -> int:
        from vllm.model_executor.models.utils import extract_layer_index

        prefix = getattr(layer, "prefix", None)
        if not prefix:
            raise SharedWeightError(
                f"layer {type(layer).__name__} has no prefix; pass layer_idx explicitly"
            )
        try:
            return extract_layer_index(prefix)
        except (AssertionError, ValueError) as e:
            raise SharedWeightError(
                f"cannot read a layer index from prefix {prefix!r}: {e}"
            ) from None

    def _hook_post_load(self, layer: nn.Module, quant_method: Any) -> Callable:
        """Route this layer's post-load call to :meth:`finalize`; return the original."""
        current = quant_method.process_weights_after_loading
        original = getattr(current, "_shared_weight_original", current)
        if original is current:  # not hooked yet (quant methods may be shared)

            def process_weights_after_loading(module: nn.Module) -> None:
                series = getattr(module, "shared_weight_series", None)
                if series is None:
                    original(module)
                else:
                    series.finalize()

            process_weights_after_loading._shared_weight_original = original
            quant_method.process_weights_after_loading = process_weights_after_loading
        return original

    def _install_forward_wrapper(self, layer: nn.Module, member: _Member) -> None:
        inner = layer.forward
        series = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            anchor = args[0] if args else next(iter(kwargs.values()))
            series.wait(member.position, anchor)
            out = inner(*args, **kwargs)
            if isinstance(out, tuple):
                if not series.owns_position(member.position):
                    # Extra outputs (vLLM returns the bias with skip_bias_add)
                    # are views of the ring slot the prefetch is about to
                    # overwrite: hand the caller its own copy.
                    out = (out[0],) + tuple(
                        o.clone() if isinstance(o, torch.Tensor) else o for o in out[1:]
                    )
                series.prefetch_after(member.position, out[0])
            else:
                series.prefetch_after(member.position, out)
            return out

        layer.forward = forward

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
                    f"{got} (layer {_layer_name(m.layer)!r} has index {m.layer_idx}, "
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

        self._num_slot_records = max(k, 1)
        self._slot_position = [-1] * self._num_slot_records
        self._slot_work = [None] * self._num_slot_records
        for p, m in enumerate(members):
            state = self._materialise(m)
            if self.slot_format is None:
                self.slot_format = slot_format_for(state)
            try:
                layouts = self.slot_format.plan(state)
            except SlotFormatError as e:
                raise SharedWeightError(f"layer {_layer_name(m.layer)!r}: {e}") from e
            if p == 0:
                self._layouts = layouts
                self.per_layer_bytes = self.slot_format.buffer_bytes(layouts, state)
                self._allocate_slots(state)
            elif [lay.signature() for lay in layouts] != [
                lay.signature() for lay in self._layouts
            ]:
                raise SharedWeightError(
                    f"series {self.name!r}: layer {_layer_name(m.layer)!r} has a "
                    "different processed layout (name, kind, dtype, shape, stride) "
                    f"than {_layer_name(members[0].layer)!r}: "
                    f"{[lay.signature() for lay in layouts]} vs "
                    f"{[lay.signature() for lay in self._layouts]}"
                )
            self._bind(m, state)
            m.layer.shared_weight_position = p
            m.raw = []
        if k > 0:
            self._slot_position = list(range(k))  # initial fill: positions 0..k-1
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

    def _materialise(self, m: _Member) -> list[tuple[str, str, torch.Tensor]]:
        """Raw weights onto every rank, original post-method, processed state out."""
        layer, p = m.layer, m.position
        mine = self.owns_position(p)
        params = []
        for r in m.raw:
            param = layer._parameters.get(r.name)
            if param is None:
                raise SharedWeightError(
                    f"layer {_layer_name(layer)!r} lost parameter {r.name!r} "
                    "between registration and finalisation"
                )
            if not mine:
                param.data = torch.empty(r.shape, dtype=r.dtype, device=r.device)
            # (no owner-only shape check here: raising on one rank would leave
            # the others blocked in the broadcast below)
            params.append(param.data)
        if self.world_size > 1:
            _broadcast_packed(
                params, src=self.group.ranks[self.owner_of_position(p)],
                group=self.group.device_group, is_src=mine,
            )
        del params
        m.post_method(layer)

        weight = getattr(layer, "weight", None)
        if any(r.name == "weight" for r in m.raw) and (
            not isinstance(weight, torch.Tensor) or weight.numel() == 0
        ):
            raise SharedWeightError(
                f"layer {_layer_name(layer)!r}: {type(layer.quant_method).__name__}."
                "process_weights_after_loading left layer.weight empty or not a "
                "tensor (an opaque packed representation); it cannot be broadcast, "
                "so this quant method cannot be used in a shared-weight series"
            )
        state = [
            (n, "param", t)
            for n, t in layer.named_parameters(recurse=False)
            if isinstance(t, torch.Tensor) and t.numel() > 0
        ]
        state += [
            (n, "buffer", t)
            for n, t in layer.named_buffers(recurse=False)
            if isinstance(t, torch.Tensor) and t.numel() > 0
        ]
        if not state:
            raise SharedWeightError(
                f"layer {_layer_name(layer)!r} has no tensor state after post-processing"
            )
        return state

    def _slots_needed(self) -> set[int]:
        k, L = self.prefetch_step, self.num_layers
        return {slot_of_position(p, k) for p in range(L) if not self.owns_position(p)}

    def _new_buffer(self, state: list[tuple[str, str, torch.Tensor]]) -> SlotBuffer:
        try:
            return self.slot_format.new_buffer(self._layouts, state)
        except SlotFormatError as e:
            raise SharedWeightError(f"series {self.name!r}: {e}") from e

    def _allocate_slots(self, state: list[tuple[str, str, torch.Tensor]]) -> None:
        for s in sorted(self._slots_needed()):
            self._slots[s] = self._new_buffer(state)

    def _bind(self, m: _Member, state: list[tuple[str, str, torch.Tensor]]) -> None:
        p, k = m.position, self.prefetch_step
        if self.owns_position(p):
            buf = self._resident[p] = self._new_buffer(state)
            fill = True
        else:
            buf = self._slots[slot_of_position(p, k)]
            fill = k > 0 and p < k  # the ring starts out holding positions 0..k-1
        if fill:
            self.slot_format.fill(buf, state)
        for view, (name, kind, _) in zip(buf.views, state):
            table = m.layer._parameters if kind == "param" else m.layer._buffers
            table[name].data = view

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

    def _issue(self, position: int, slot: int, async_op: bool) -> Any:
        if self.world_size == 1:
            return None
        self.num_broadcasts += 1
        owner = self.owner_of_position(position)
        buf = self._resident[position] if owner == self.rank_in_group else self._slots[slot]
        return buf.broadcast(src=self.group.ranks[owner], group=self.group.device_group,
                             async_op=async_op)

    def _wait_position(self, position: int) -> None:
        self._check_position(position)
        self.num_waits += 1
        k = self.prefetch_step
        if k == 0:
            if self._slot_position[0] != position:
                self._issue(position, 0, async_op=False)
                self._slot_position[0] = position
            return
        s = position % k
        held = self._slot_position[s]
        if held != position:
            raise SharedWeightError(
                f"series {self.name!r}: slot {s} holds the weights of position {held} "
                f"(layer {self.start_layer + held}), not of position {position} "
                f"(layer {self.start_layer + position}); the series' layers must run "
                "in order on every rank of the group"
            )
        work = self._slot_work[s]
        if work is not None:
            self._slot_work[s] = None
            work.wait()

    def _prefetch_after_position(self, position: int) -> None:
        self._check_position(position)
        self.num_prefetches += 1
        k = self.prefetch_step
        if k == 0:
            return
        q = next_prefetch_position(position, k, self.num_layers)
        if q == position:  # the slot's only user: it already holds the right data
            return
        s = position % k
        if self._slot_position[s] != position:
            raise SharedWeightError(
                f"series {self.name!r}: prefetch after position {position}, but slot "
                f"{s} holds position {self._slot_position[s]} (missing wait?)"
            )
        pending = self._slot_work[s]
        if pending is not None:
            pending.wait()
        self._slot_work[s] = self._issue(q, s, async_op=True)
        self._slot_position[s] = q

    def synchronize(self) -> None:
        """Wait for every outstanding broadcast of this series."""
        for s, work in enumerate(self._slot_work):
            if work is not None:
                self._slot_work[s] = None
                work.wait()

    # -------------------------------------------------------------- report

    def memory_report(self) -> SharedWeightMemoryReport:
        if not self._finalized:
            raise SharedWeightError(f"series {self.name!r} is not finalised")
        per, L, n = self.per_layer_bytes, self.num_layers, self.world_size
        resident = sum(b.nbytes for b in self._resident.values())
        resident += sum(b.nbytes for b in self._slots.values())
        return SharedWeightMemoryReport(
            num_layers=L, world_size=n, prefetch_step=self.prefetch_step,
            per_layer_bytes=per, owned_layers=len(self._resident),
            slots=len(self._slots), resident_bytes=resident,
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
            if self._registry.find(self.name) is self:
                self._registry.unregister(self.name)

    def __repr__(self) -> str:
        return (
            f"SharedWeightSeries({self.name!r}, n={self.world_size}, "
            f"rank={self.rank_in_group}, k={self.prefetch_step}, "
            f"layers={[m.layer_idx for m in self._members]}, "
            f"finalized={self._finalized})"
        )


def _broadcast_packed(
    tensors: list[torch.Tensor], src: int, group: Any, is_src: bool
) -> None:
    """Broadcast several tensors as one byte buffer (any dtype, one collective)."""
    if not tensors:
        return
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for nb in sizes:
        offsets.append(total)
        total += round_up(max(nb, 1))
    buf = torch.empty(total, dtype=_BYTE_DTYPE, device=tensors[0].device)
    if is_src:
        for t, off, nb in zip(tensors, offsets, sizes):
            buf[off : off + nb].copy_(t.detach().contiguous().reshape(-1).view(_BYTE_DTYPE))
    dist.broadcast(buf, src=src, group=group)
    if not is_src:
        for t, off, nb in zip(tensors, offsets, sizes):
            t.copy_(buf[off : off + nb].view(t.dtype).view(t.shape))


# --------------------------------------------------------------------------
# upstream-compatible module functions
# --------------------------------------------------------------------------


def register_layer_to_shared_weight_series(
    series_name: str, group: Any, layer: nn.Module, prefetch_step: int = 1
) -> SharedWeightSeries:
    """Add ``layer`` to the series ``series_name``, creating it on first use."""
    series = shared_weight_registry.find(series_name)
    if series is None:
        series = SharedWeightSeries(series_name, group, prefetch_step)
    elif series.group is not group or series.prefetch_step != prefetch_step:
        raise SharedWeightError(
            f"layer {_layer_name(layer)!r}: series {series_name!r} exists with a "
            f"different group or prefetch_step ({series.prefetch_step} vs {prefetch_step})"
        )
    series.add_layer(layer)
    return series


def _series_of(layer: nn.Module) -> SharedWeightSeries:
    series = getattr(layer, "shared_weight_series", None)
    if series is None:
        raise SharedWeightError(
            f"layer {_layer_name(layer)!r} is not registered in a shared-weight series"
        )
    return series


def post_process_after_loading_for_shared_weight_series(layer: nn.Module) -> None:
    """Finalise ``layer``'s series (idempotent; vLLM's post-load pass does it too)."""
    _series_of(layer).finalize()


def reach_layer_for_shared_weight_series(layer: nn.Module) -> None:
    """No-op kept for migrating callers.

    Prefetches are issued automatically right after each member's matmul
    (the ``shared_weight_prefetch`` op), which is the earliest point the slot
    is free; an extra call here would have nothing left to do.
    """
    _series_of(layer)


def is_hidden_layer(vllm_config: Any, layer: nn.Module) -> bool:
    """True for decoder layers proper (MTP layers have index >= num_hidden_layers)."""
    from vllm.model_executor.models.utils import extract_layer_index

    num_hidden_layers = vllm_config.model_config.hf_config.num_hidden_layers
    return extract_layer_index(layer.prefix) < num_hidden_layers
