"""Which processed tensors of a row-parallel o_proj differ between TP ranks.

TP-shard storage keeps plain TP's o_proj on every rank and builds FlashComm2's
wider weight by all-gathering the shards of one ODP group. Only the tensors
that are sharded along the input dimension move; every other processed tensor
(per-output-channel scales, a per-tensor input scale, the bias) is the same
on every TP rank and is used as it is. Some kernels want a per-input-channel
vector that each rank holds for its own columns only but that is one value
repeated; those are repeated locally, not gathered.

The quant method declares this, after its own post-processing:

- vllm-ascend: a method with ``supports_tp_weight_switch`` lists it in
  ``tp_weight_gather_specs`` / ``tp_weight_repeat_specs``
  (``vllm_ascend/quantization/tp_weight_switch.py``, main@182b75ea): its
  unquantized method gathers ``weight`` along dim 1, the W8A8 methods
  ``weight`` along dim 0 of their transposed ``[K, N]`` weight, and the
  static one repeats its ``aclnn_input_*`` vectors. We read those
  declarations; the mixin's own buffers do not fit here (for a dim other
  than 0 it keeps a transposed copy of every layer's shard, one more
  ``L * W / P`` per rank).
- vLLM (CPU, CUDA), our declarations: the unquantized method (``weight``
  ``[N, K]``, dim 1), and vLLM CPU's int8 W8A8 kernel on its oneDNN route with
  symmetric activations, which the shard keeps as a plain ``[K, N]`` int8
  weight (``ops/cpu_int8.py``; dim 0).

Anything else has no declaration: o_shared then keeps round-robin storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ShardSpecs", "TensorSpec", "shard_specs_for"]


@dataclass(frozen=True)
class TensorSpec:
    """One processed attribute of the layer and the dim it is sharded (or repeated) on."""

    attr: str
    dim: int


@dataclass(frozen=True)
class ShardSpecs:
    gathered: tuple[TensorSpec, ...]
    repeated: tuple[TensorSpec, ...]
    declared_by: str  # for the start-up log and errors

    @property
    def attrs(self) -> tuple[str, ...]:
        return tuple(s.attr for s in self.gathered + self.repeated)


def _scheme_of(method: Any) -> Any:
    """vllm-ascend wraps its quant schemes in ``AscendLinearMethod``."""
    from vllm_ascend_ext.ops.quant_terms import takes_rank

    return method.quant_method if takes_rank(method) else method


def _ascend_specs(method: Any) -> ShardSpecs | None:
    scheme = _scheme_of(method)
    if not getattr(scheme, "supports_tp_weight_switch", False):
        return None
    gathered = tuple(TensorSpec(s.attr_name, s.gather_dim)
                     for s in getattr(scheme, "tp_weight_gather_specs", ()))
    repeated = tuple(TensorSpec(s.attr_name, s.repeat_dim)
                     for s in getattr(scheme, "tp_weight_repeat_specs", ()))
    if not gathered:
        return None
    return ShardSpecs(gathered, repeated,
                      f"{type(scheme).__name__}.tp_weight_gather_specs (vllm-ascend)")


def shard_specs_for(row_parallel: Any) -> ShardSpecs | None:
    """What to gather for ``row_parallel`` (vLLM's o_proj of one layer, built
    but not loaded), or None where its quant method declares nothing."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    method = getattr(row_parallel, "quant_method", None)
    if method is None:
        return None
    ascend = _ascend_specs(method)
    if ascend is not None:
        return ascend
    if type(method) is UnquantizedLinearMethod:
        return ShardSpecs((TensorSpec("weight", 1),), (), "vLLM UnquantizedLinearMethod")
    from vllm_ascend_ext.ops.cpu_int8 import int8_kernel_of, takes_onednn_route

    kernel = int8_kernel_of(row_parallel)
    if (kernel is not None and kernel.config.input_symmetric
            and takes_onednn_route(row_parallel, kernel)):
        # ops/cpu_int8.py keeps it as a [K, N] int8 weight plus
        # per-output-channel scales: only the weight is per rank.
        return ShardSpecs((TensorSpec(kernel.layer_param_names[0], 0),), (),
                          "vLLM CPU int8 W8A8 (plain int8 weight)")
    return None
