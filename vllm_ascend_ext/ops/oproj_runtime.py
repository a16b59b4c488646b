"""One runtime record per FlashComm2 o_proj, and the custom ops that index them.

A FlashComm2 forward reads its layer's :class:`OProjRuntime` and nothing
else: which o_shared ring holds the weight its matmul needs and at which
position, whether that slot holds the whole processed layer, and the int8
route of its all-to-all. Each field is set once: the store when the install
registers the layer, the ring and position when loading binds it
(``ops/tp_shard/storage.py``, ``ops/shared_weight/series.py``), the int8
route on the first eager call after loading. None is looked up per call.

The custom ops take ``(tensor, index)``, an int that torch.compile passes
through as a constant, and index the list this module keeps, as vLLM's
``model_executor/offloader/prefetch_ops.py`` does. The layer owns its record
(and the model state owns the list of its layers' records); the list here
holds weak references, so a record lives exactly as long as its layer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vllm_ascend_ext.custom_ops import register_custom_op
from vllm_ascend_ext.ops.adaptive_oproj import adaptive_oproj
from vllm_ascend_ext.ops.flashcomm2_plan import padded_token_count

__all__ = ["OProjRuntime", "RingHooks", "UNRESOLVED", "new_runtime", "runtime_at"]

#: The int8 route before the first eager call has read it.
UNRESOLVED: Any = type("Unresolved", (), {"__repr__": lambda self: "UNRESOLVED"})()

_RUNTIMES: list[weakref.ref] = []


class RingHooks(Protocol):
    """What a FlashComm2 step needs of an o_shared ring (``tp_shard.ring.GatherRing``,
    ``shared_weight.ring.SlotRing``)."""

    def wait(self, position: int) -> None: ...

    def prefetch_after(self, position: int) -> None: ...


class _NoRing:
    """The ring of a layer whose store has not bound it yet (loading has not
    reached it), or has closed: a forward then fails naming the layer and
    why, instead of running FlashComm2 on weights that are not there."""

    def __init__(self, why: str) -> None:
        self.why = why

    def wait(self, position: int) -> None:
        raise RuntimeError(self.why)

    prefetch_after = wait


@dataclass(eq=False)
class OProjRuntime:
    """What one FlashComm2 o_proj's forward reads, resolved before the call."""

    index: int  # in the ops' list: the int the custom ops take
    prefix: str
    layer_ref: weakref.ref
    #: o_shared's store (``TPShardStorage`` or ``SharedWeightSeries``), None without o_shared.
    store: Any = None
    #: The ring holding this layer's FlashComm2 weight, once loading bound it.
    ring: RingHooks | None = None
    position: int = -1
    #: Round-robin slots hold the whole processed layer (bias and scales too),
    #: TP-shard slots only the gathered weight.
    whole_layer_in_ring: bool = False
    #: ``int8_all_to_all.Int8Input`` or None once read; UNRESOLVED before.
    int8_route: Any = UNRESOLVED

    @property
    def layer(self) -> Any:
        layer = self.layer_ref()
        if layer is None:
            raise RuntimeError(f"FlashComm2 o_proj {self.prefix!r} is not alive")
        return layer

    def join_store(self, store: Any) -> None:
        """At install, before loading: ``store`` keeps this layer's weight."""
        self.store = store
        self.ring = _NoRing(
            f"{self.prefix!r}: o_shared {store.name!r} has not bound this layer yet; run the "
            "model's process_weights_after_loading before any forward")
        self.position = -1
        self.whole_layer_in_ring = store.holds_whole_layer

    def bind(self, ring: RingHooks, position: int) -> None:
        """At load: the weight lives at ``position`` of ``ring``."""
        self.ring, self.position = ring, position

    def release(self) -> None:
        """The store closed: its ring may be freed, and no step may run it."""
        self.ring = _NoRing(f"{self.prefix!r}: o_shared {self.store.name!r} is closed")


def new_runtime(layer: Any) -> OProjRuntime:
    """A record for ``layer`` (a FlashComm2 o_proj under construction)."""
    runtime = OProjRuntime(index=len(_RUNTIMES), prefix=getattr(layer, "prefix", "") or "",
                           layer_ref=weakref.ref(layer))
    _RUNTIMES.append(weakref.ref(runtime))
    return runtime


def runtime_at(index: int) -> OProjRuntime:
    runtime = _RUNTIMES[index]()
    if runtime is None:
        raise RuntimeError(f"FlashComm2 o_proj runtime {index} is not alive (its layer is gone)")
    return runtime


# ----------------------------------------------------------------------------
# the ops. The ring's two hooks mutate their anchor (the matmul's input, then
# its output), which keeps them in order around the matmul under torch.compile.
# ----------------------------------------------------------------------------


def _oproj_ring_wait(anchor: torch.Tensor, index: int) -> None:
    runtime = runtime_at(index)
    runtime.ring.wait(runtime.position)


def _oproj_ring_prefetch(anchor: torch.Tensor, index: int) -> None:
    runtime = runtime_at(index)
    runtime.ring.prefetch_after(runtime.position)


def _oproj_ring_hook_fake(anchor: torch.Tensor, index: int) -> None:
    return None


def _adaptive_oproj(x: torch.Tensor, index: int, sequence_parallel: bool) -> torch.Tensor:
    return adaptive_oproj(runtime_at(index).layer, x, sequence_parallel)


def _adaptive_oproj_fake(x: torch.Tensor, index: int, sequence_parallel: bool) -> torch.Tensor:
    layer = runtime_at(index).layer
    rows = x.shape[0]
    if sequence_parallel:
        P = layer.flashcomm2_tp_size
        rows = padded_token_count(rows, P) // P
    return x.new_empty((rows, layer.output_size))


register_custom_op("oproj_ring_wait", _oproj_ring_wait, _oproj_ring_hook_fake,
                   mutates_args=["anchor"])
register_custom_op("oproj_ring_prefetch", _oproj_ring_prefetch, _oproj_ring_hook_fake,
                   mutates_args=["anchor"])
register_custom_op("flashcomm2_adaptive_oproj", _adaptive_oproj, _adaptive_oproj_fake)
