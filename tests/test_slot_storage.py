"""The per-platform buffer formats behind o_shared's ring slots
(``vllm_ascend_ext/ops/slot_storage.py``; docs/ascend.md contract 4).

The two-rank series that runs both formats end to end is
``tests/test_shared_weight.py::test_ring_slots_keep_the_npu_storage_format``.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from vllm_ascend_ext.ops.slot_storage import (
    NpuStorageFormat,
    PackedBytes,
    SlotFormatError,
    slot_format_for,
)

# Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
pytestmark = pytest.mark.vllm_independent


def _state():
    w = torch.arange(8 * 16, dtype=torch.float32).view(8, 16).t()  # transposed view
    return [("weight", "param", w), ("weight_scale", "buffer", torch.ones(8))]


def test_packed_bytes_views_alias_one_buffer():
    state = _state()
    fmt = PackedBytes()
    layouts = fmt.plan(state)
    buf = fmt.new_buffer(layouts, state)
    assert len(buf.wire) == 1 and buf.wire[0].dtype == torch.uint8
    assert buf.nbytes == buf.wire[0].numel() == 512 + 64  # 64-byte aligned spans
    fmt.fill(buf, state)
    for view, (_, _, t) in zip(buf.views, state):
        assert view.untyped_storage().data_ptr() == buf.wire[0].untyped_storage().data_ptr()
        assert torch.equal(view, t) and view.stride() == t.stride()


def _tagging():
    """A stand-in for torch_npu's format lookup: tensors tagged by identity."""
    tags: dict[int, int] = {}

    def npu_format(t):
        return tags.get(id(t), 2)

    def empty_like(t):
        out = torch.empty_like(t)
        tags[id(out)] = tags.get(id(t), 2)
        return out

    return tags, npu_format, empty_like


def test_npu_format_gives_each_tensor_a_buffer_in_its_own_format():
    state = _state()
    tags, npu_format, empty_like = _tagging()
    tags[id(state[0][2])] = 29
    fmt = NpuStorageFormat(npu_format=npu_format, empty_like=empty_like)
    layouts = fmt.plan(state)
    assert [lay.storage_format for lay in layouts] == [29, 2]
    # non-base format: the storage's own size; base format: the logical span
    assert [lay.span_bytes for lay in layouts] == [512, 32]
    buf = fmt.new_buffer(layouts, state)
    assert buf.views == buf.wire and len(buf.wire) == 2
    assert [npu_format(t) for t in buf.wire] == [29, 2]
    assert buf.nbytes == 512 + 32
    fmt.fill(buf, state)
    assert all(torch.equal(v, t) for v, (_, _, t) in zip(buf.views, state))


def test_a_buffer_that_loses_the_format_is_refused():
    state = _state()
    tags, npu_format, _ = _tagging()
    tags[id(state[0][2])] = 29
    fmt = NpuStorageFormat(npu_format=npu_format, empty_like=torch.empty_like)
    with pytest.raises(SlotFormatError, match=r"'weight'.*storage format 2, not its format 29"):
        fmt.new_buffer(fmt.plan(state), state)


def test_a_buffer_smaller_than_the_real_storage_is_refused():
    padded = torch.zeros(256)[:128].view(8, 16)  # storage 1024 B, logical 512 B
    state = [("weight", "param", padded)]
    tags, npu_format, _ = _tagging()
    tags[id(padded)] = 29

    def dense_empty_like(t):  # keeps the format tag, but not the padded size
        out = torch.empty_like(t)
        tags[id(out)] = 29
        return out

    fmt = NpuStorageFormat(npu_format=npu_format, empty_like=dense_empty_like)
    with pytest.raises(SlotFormatError, match="512 storage bytes, fewer than its 1024"):
        fmt.new_buffer(fmt.plan(state), state)


def test_format_is_chosen_by_device(monkeypatch):
    assert isinstance(slot_format_for(_state()), PackedBytes)
    fake_npu = SimpleNamespace(get_npu_format=lambda t: 2)
    monkeypatch.setitem(sys.modules, "torch_npu", fake_npu)
    npu_state = [("weight", "param", SimpleNamespace(device=torch.device("meta")))]
    npu_state[0][2].device = SimpleNamespace(type="npu")
    fmt = slot_format_for(npu_state)
    assert isinstance(fmt, NpuStorageFormat) and fmt._npu_format is fake_npu.get_npu_format
