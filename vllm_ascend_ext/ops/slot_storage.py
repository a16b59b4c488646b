"""How one layer's post-processed tensors are stored in an o_shared buffer.

A shared-weight series keeps each owned layer in a resident buffer and
receives the others into ring slots. What such a buffer *is* depends on how
the platform stores a processed weight:

- CPU / CUDA (:class:`PackedBytes`): a tensor's storage is its logical
  elements, so every tensor of a layer (weight, scales, ...) is a typed
  ``as_strided`` view of ONE flat ``uint8`` buffer: one broadcast per layer,
  and transposed or padded layouts survive.
- Ascend (:class:`NpuStorageFormat`): torch_npu keeps a tensor's format (ND,
  FRACTAL_NZ, ...) in its storage descriptor, and an NZ storage is padded to
  16x16 blocks. A typed view of a plain byte buffer is ND: copying an NZ
  weight into it converts it (or fails), and byte sizes computed from
  logical strides miss the padding. So each tensor gets a buffer of its own,
  made by ``torch.empty_like`` (torch_npu's ``empty_like_npu`` allocates
  non-base formats with ``ApplyTensorWithFormat(sizes, options, npu_format)``,
  i.e. the same format at its real storage size), filled by a storage-to-
  storage ``copy_`` between tensors of one format, broadcast one collective
  per tensor, and checked with ``torch_npu.get_npu_format``.

:func:`slot_format_for` picks the format by the processed tensors' device
type, so Ascend-only code runs only for ``npu`` tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = [
    "PACK_ALIGN",
    "NpuStorageFormat",
    "PackedBytes",
    "SlotBuffer",
    "SlotFormat",
    "SlotFormatError",
    "TensorLayout",
    "slot_format_for",
    "span_elements",
]

#: Byte alignment of every tensor inside a packed buffer.
PACK_ALIGN = 64

_BYTE_DTYPE = torch.uint8

# One processed layer: (name, "param" | "buffer", tensor), in a fixed order.
LayerState = list[tuple[str, str, torch.Tensor]]


class SlotFormatError(ValueError):
    """A processed tensor cannot be held in a buffer of this format."""


def round_up(x: int, align: int = PACK_ALIGN) -> int:
    return (x + align - 1) // align * align


def span_elements(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Number of storage elements a strided tensor touches (first to last)."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


@dataclass(frozen=True)
class TensorLayout:
    """One post-processed tensor of a layer and where it lives in a packed buffer."""

    name: str
    kind: str  # "param" or "buffer"
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # byte offset in the packed buffer (PACK_ALIGN-aligned)
    span_bytes: int  # bytes of storage the view spans
    storage_format: int | None = None  # torch_npu format id; None off Ascend

    def signature(self) -> tuple:
        return (self.name, self.kind, self.dtype, self.shape, self.stride, self.storage_format)

    def view_of(self, flat: torch.Tensor) -> torch.Tensor:
        """Typed strided view of this tensor inside the packed ``flat`` buffer."""
        typed = flat[self.offset : self.offset + self.span_bytes].view(self.dtype)
        return typed.as_strided(self.shape, self.stride)


@dataclass
class SlotBuffer:
    """One layer's worth of storage: what a broadcast carries (``wire``) and
    the tensors the layer's parameters are bound to (``views``)."""

    wire: list[torch.Tensor]
    views: list[torch.Tensor]
    nbytes: int  # real storage bytes of ``wire``

    def broadcast(self, src: int, group: Any, async_op: bool) -> Any:
        """Broadcast every wire tensor; returns one waitable (or None)."""
        import torch.distributed as dist

        works = [dist.broadcast(t, src=src, group=group, async_op=async_op) for t in self.wire]
        return _AllWorks(works) if async_op else None


@dataclass
class _AllWorks:
    works: list[Any] = field(default_factory=list)

    def wait(self) -> None:
        for w in self.works:
            w.wait()


class SlotFormat(ABC):
    """A platform's way of holding one processed layer in a buffer."""

    name: str

    @abstractmethod
    def plan(self, state: LayerState) -> tuple[TensorLayout, ...]:
        """Layouts of the layer's processed tensors (compared across members)."""

    @abstractmethod
    def buffer_bytes(self, layouts: tuple[TensorLayout, ...], state: LayerState) -> int:
        """Real bytes one buffer of this layer takes."""

    @abstractmethod
    def new_buffer(self, layouts: tuple[TensorLayout, ...], state: LayerState) -> SlotBuffer:
        """A zeroed buffer shaped like ``state`` (on ``state``'s device)."""

    def fill(self, buffer: SlotBuffer, state: LayerState) -> None:
        """Copy ``state`` into ``buffer``, storage to storage."""
        for view, (_, _, tensor) in zip(buffer.views, state):
            view.copy_(tensor.detach())


def _check_strides(state: LayerState) -> None:
    for name, _, t in state:
        if any(s < 0 for s in t.stride()):
            raise SlotFormatError(f"tensor {name!r} has a negative stride")


class PackedBytes(SlotFormat):
    """CPU / CUDA: every tensor a typed view of one flat byte buffer."""

    name = "packed-bytes"

    def plan(self, state: LayerState) -> tuple[TensorLayout, ...]:
        _check_strides(state)
        out, offset = [], 0
        for name, kind, t in state:
            span = span_elements(tuple(t.shape), tuple(t.stride())) * t.element_size()
            out.append(TensorLayout(name, kind, t.dtype, tuple(t.shape), tuple(t.stride()),
                                    offset, span))
            offset += round_up(max(span, 1))
        return tuple(out)

    def buffer_bytes(self, layouts: tuple[TensorLayout, ...], state: LayerState) -> int:
        return round_up(sum(round_up(lay.span_bytes) for lay in layouts) or PACK_ALIGN)

    def new_buffer(self, layouts: tuple[TensorLayout, ...], state: LayerState) -> SlotBuffer:
        nbytes = self.buffer_bytes(layouts, state)
        flat = torch.zeros(nbytes, dtype=_BYTE_DTYPE, device=state[0][2].device)
        return SlotBuffer(wire=[flat], views=[lay.view_of(flat) for lay in layouts],
                          nbytes=nbytes)


def _storage_nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


# torch_npu's base formats (FormatHelper::IsBaseFormatType): NCHW, NHWC, ND,
# NCDHW. Their storage is the logical elements; any other format (FRACTAL_NZ
# = 29, ...) is padded, and only its storage knows its size.
_NPU_BASE_FORMATS = frozenset({0, 1, 2, 30})


class NpuStorageFormat(SlotFormat):
    """Ascend: one buffer per tensor, in that tensor's own storage format.

    ``npu_format`` reads a tensor's format (``torch_npu.get_npu_format``) and
    ``empty_like`` allocates a buffer like it (``torch.empty_like``, which
    torch_npu dispatches to ``empty_like_npu``); both are injectable so the
    format logic runs in CPU tests with a stand-in for torch_npu.
    """

    name = "npu-storage-format"

    def __init__(self, npu_format: Callable[[torch.Tensor], int] | None = None,
                 empty_like: Callable[[torch.Tensor], torch.Tensor] = torch.empty_like) -> None:
        if npu_format is None:
            import torch_npu  # Ascend only: reached for npu tensors

            npu_format = torch_npu.get_npu_format
        self._npu_format = npu_format
        self._empty_like = empty_like

    def plan(self, state: LayerState) -> tuple[TensorLayout, ...]:
        _check_strides(state)
        out = []
        for name, kind, t in state:
            fmt = int(self._npu_format(t))
            span = (span_elements(tuple(t.shape), tuple(t.stride())) * t.element_size()
                    if fmt in _NPU_BASE_FORMATS else _storage_nbytes(t))
            out.append(TensorLayout(name, kind, t.dtype, tuple(t.shape), tuple(t.stride()),
                                    0, span, fmt))
        return tuple(out)

    def buffer_bytes(self, layouts: tuple[TensorLayout, ...], state: LayerState) -> int:
        return sum(lay.span_bytes for lay in layouts)

    def new_buffer(self, layouts: tuple[TensorLayout, ...], state: LayerState) -> SlotBuffer:
        wire = []
        for lay, (name, _, t) in zip(layouts, state):
            buf = self._empty_like(t)
            got = int(self._npu_format(buf))
            if got != lay.storage_format:
                raise SlotFormatError(
                    f"tensor {name!r}: a buffer made like it has storage format {got}, not "
                    f"its format {lay.storage_format}; a copy would convert the layout")
            if _storage_nbytes(buf) < lay.span_bytes:
                raise SlotFormatError(
                    f"tensor {name!r}: a buffer made like it has {_storage_nbytes(buf)} "
                    f"storage bytes, fewer than its {lay.span_bytes}")
            if tuple(buf.stride()) != lay.stride:
                raise SlotFormatError(
                    f"tensor {name!r}: a buffer made like it has strides {tuple(buf.stride())}, "
                    f"not {lay.stride} (a non-dense processed tensor cannot be mirrored)")
            buf.zero_()
            wire.append(buf)
        return SlotBuffer(wire=wire, views=list(wire),
                          nbytes=sum(_storage_nbytes(t) for t in wire))


def slot_format_for(state: LayerState) -> SlotFormat:
    """The format for a layer whose processed tensors are ``state``."""
    device = state[0][2].device
    if device.type == "npu":
        return NpuStorageFormat()
    return PackedBytes()
