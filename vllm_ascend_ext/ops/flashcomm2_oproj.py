"""FlashComm2 o_proj: all-to-all before the projection instead of an all-reduce after.

Notation: ``T`` tokens, ``P`` TP size, ``k`` o_proj TP (OTP) size, ``D = P/k``
(ODP size), ``a`` o_proj input features (heads x v_head_dim), ``h`` hidden
size.  TP rank ``r = j*D + i`` is OTP rank ``j`` and ODP rank ``i`` (see
``vllm_ascend_ext.distributed.parallel_state``); it receives ``[T, a/P]``
(its heads) and holds o_proj input columns ``[j*a/k, (j+1)*a/k)``.

Forward on every TP rank:

1. pad ``T`` to ``T_pad``, a multiple of ``P`` (zero rows); token block ``b``
   (``b < P``) is rows ``[b*T_pad/P, (b+1)*T_pad/P)``;
2. reorder blocks so that all-to-all chunk ``i`` (sent to ODP rank ``i``)
   holds blocks ``j*D + i`` for ``j < k``, in ``j`` order (identity when
   ``k = 1``);
3. all-to-all over ODP (in int8 where the o_proj quantizes its input
   anyway and ``int8_all_to_all`` is on: ``ops/int8_all_to_all.py``):
   chunk ``i`` comes back from ODP rank ``i`` holding the
   same token rows for that rank's ``a/P`` columns; concatenating the ``D``
   chunks along features gives ``[T_pad*k/P, a/k]``, exactly this rank's o_proj
   input columns for the token blocks ``{j*D + i_self}``;
4. local matmul with the o_proj shard (``quant_method.apply``) -> partial sums
   ``[T_pad*k/P, h]``;
5. ``k > 1``: reduce-scatter over OTP -> ``[T_pad/P, h]``; OTP rank ``j`` keeps
   block ``j*D + i`` = its TP rank ``r``: the usual sequence-parallel layout;
6. bias (once, after the reduction);
7. unless a token-sharded (sequence-parallel) output is asked for: all-gather
   over TP -> ``[T_pad, h]`` in token order, padding rows removed.

The block bookkeeping lives in ``ops/flashcomm2_plan.py``
(:func:`flashcomm2_plan`, :func:`permute_blocks_for_all_to_all`), which the
adaptive small side uses too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn import Parameter

from vllm.model_executor.layers.linear import (
    WEIGHT_LOADER_V2_SUPPORTED,
    LinearBase,
    RowParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

from vllm_ascend_ext.distributed.communication import (
    all_gather_dim0,
    all_reduce_max,
    all_to_all_dim0,
    reduce_scatter_dim0,
)
from vllm_ascend_ext.ops.adaptive_oproj import adaptive_oproj
from vllm_ascend_ext.ops.ascend_linear import platform_linear_method
from vllm_ascend_ext.ops.flashcomm2_plan import padded_token_count, permute_blocks_for_all_to_all
from vllm_ascend_ext.ops.int8_all_to_all import (
    Int8Input,
    int8_input_of,
    per_token_absmax,
    quantize_per_token,
)
from vllm_ascend_ext.ops.oproj_runtime import UNRESOLVED, OProjRuntime, new_runtime
from vllm_ascend_ext.ops.quant_terms import apply_linear
from vllm_ascend_ext.ops.resident_slice import run_resident_slice

#: ops/tp_shard/storage.py binds a layer's OTP view under this name.
OTP_VIEW_ATTR = "tp_shard_otp_view"

__all__ = ["FlashComm2RowParallelLinear"]


# --------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------


class FlashComm2RowParallelLinear(RowParallelLinear):
    """Drop-in o_proj for ``RowParallelLinear`` using FlashComm2.

    The weight is sharded ``k`` ways along its input dimension by OTP rank
    (``self.tp_rank`` / ``self.tp_size`` are the OTP rank / size, so
    ``RowParallelLinear.weight_loader`` loads the right columns; ``k = 1``
    loads the full matrix).  The input is this TP rank's ``[T, a/P]`` slice,
    as for a row-parallel o_proj with ``input_is_parallel=True``; the output
    is the full ``[T, h]`` (like after the all-reduce), or with
    ``sequence_parallel_output`` the padded token block ``[T_pad/P, h]`` of
    this TP rank.

    ``forward`` accepts and ignores extra keyword arguments (vllm-ascend's MLA
    calls ``o_proj(x, is_prefill=...)``).  An o_shared store that registers
    this layer finds ``places_shared_weight_hooks`` and binds its ring and
    position into the layer's :class:`~vllm_ascend_ext.ops.oproj_runtime.OProjRuntime`
    (``self.runtime``); the layer waits on that ring right before the matmul
    and prefetches right after it, through the ops that take the runtime's index.

    ``adaptive_tokens``: a call with at most this many tokens runs plain
    TP's o_proj, which must be attached as the layer's resident slice before
    loading (:mod:`~vllm_ascend_ext.ops.adaptive_oproj`,
    :func:`~vllm_ascend_ext.ops.resident_slice.attach_resident_slice`); 0 =
    always FlashComm2.

    ``int8_all_to_all``: where the processed quant method takes int8 input
    (:func:`~vllm_ascend_ext.ops.int8_all_to_all.int8_input_of`), quantize
    before the all-to-all and send int8.
    """

    places_shared_weight_hooks = True

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
        quant_config: Any = None,
        prefix: str = "",
        *,
        return_bias: bool = True,
        disable_tp: bool = False,
        sequence_parallel_output: bool = False,
        tp_group: Any = None,
        otp_group: Any = None,
        odp_group: Any = None,
        int8_all_to_all: bool = False,
        adaptive_tokens: int = 0,
    ):
        if not input_is_parallel:
            raise ValueError(
                f"{type(self).__name__} ({prefix!r}): input_is_parallel=False is not "
                "supported; FlashComm2 consumes each TP rank's own input slice"
            )
        if not reduce_results:
            raise ValueError(
                f"{type(self).__name__} ({prefix!r}): reduce_results=False is not "
                "supported; FlashComm2 always reduces (use sequence_parallel_output "
                "to keep the output token-sharded)"
            )
        if disable_tp:
            raise ValueError(
                f"{type(self).__name__} ({prefix!r}): disable_tp=True is not supported; "
                "use a plain RowParallelLinear/ReplicatedLinear"
            )
        if adaptive_tokens < 0:
            raise ValueError(
                f"{type(self).__name__} ({prefix!r}): adaptive_tokens={adaptive_tokens} "
                "must be >= 0 (0 = always FlashComm2)"
            )
        if adaptive_tokens and skip_bias_add and bias:
            raise ValueError(
                f"{type(self).__name__} ({prefix!r}): skip_bias_add with a bias is not "
                "supported with adaptive FlashComm2 (adaptive_tokens > 0)"
            )
        if tp_group is None:
            from vllm.distributed import get_tp_group

            tp_group = get_tp_group()
        if otp_group is None or odp_group is None:
            from vllm_ascend_ext.distributed.parallel_state import (
                get_flashcomm2_odp_group,
                get_flashcomm2_otp_group,
            )

            otp_group = otp_group if otp_group is not None else get_flashcomm2_otp_group()
            odp_group = odp_group if odp_group is not None else get_flashcomm2_odp_group()

        P, k, D = tp_group.world_size, otp_group.world_size, odp_group.world_size
        if k * D != P:
            raise ValueError(
                f"{type(self).__name__} ({prefix!r}): OTP size {k} x ODP size {D} "
                f"!= TP size {P}"
            )
        r, j, i = tp_group.rank_in_group, otp_group.rank_in_group, odp_group.rank_in_group
        if r != j * D + i:
            raise ValueError(
                f"{type(self).__name__} ({prefix!r}): TP rank {r} is OTP rank {j} and "
                f"ODP rank {i}, but the FlashComm2 layout needs TP rank = OTP rank * "
                f"{D} + ODP rank; build the groups with split_tp_group()"
            )
        if input_size % P:
            raise ValueError(
                f"{type(self).__name__} ({prefix!r}): input_size={input_size} is not "
                f"divisible by the TP size {P}"
            )

        LinearBase.__init__(
            self,
            input_size,
            output_size,
            bias,
            skip_bias_add,
            params_dtype,
            quant_config,
            prefix,
            return_bias=return_bias,
            tp_rank=j,
            tp_size=k,
        )
        # On Ascend: vllm-ascend's unquantized method, as AscendRowParallelLinear has.
        self.quant_method = platform_linear_method(self.quant_method)
        # RowParallelLinear's attributes, with the OTP group as "TP".
        self.input_size_per_partition = input_size // k
        self.output_size_per_partition = output_size
        self.output_partition_sizes = [output_size]
        self.input_is_parallel = True
        self.reduce_results = True
        self.sequence_parallel_output = sequence_parallel_output

        self.flashcomm2_tp_group = tp_group
        self.flashcomm2_otp_group = otp_group
        self.flashcomm2_odp_group = odp_group
        self.flashcomm2_tp_size = P
        self.flashcomm2_tp_rank = r
        self.otp_size = k
        self.odp_size = D
        self.input_size_per_tp_rank = input_size // P
        self.int8_all_to_all = bool(int8_all_to_all)
        self.adaptive_tokens = int(adaptive_tokens)
        #: What the forward reads, resolved before the call (ops/oproj_runtime.py).
        self.runtime: OProjRuntime = new_runtime(self)
        #: True where the o_shared group spans DP replicas: the largest batch
        #: across DP picks the side (``adaptive_oproj.switch_tokens``).
        self.adaptive_dp_wide = False

        self.quant_method.create_weights(
            layer=self,
            input_size_per_partition=self.input_size_per_partition,
            output_partition_sizes=self.output_partition_sizes,
            input_size=self.input_size,
            output_size=self.output_size,
            params_dtype=self.params_dtype,
            weight_loader=(
                self.weight_loader_v2
                if self.quant_method.__class__.__name__ in WEIGHT_LOADER_V2_SUPPORTED
                else self.weight_loader
            ),
        )
        if bias:
            self.bias = Parameter(
                torch.empty(self.output_size, dtype=self.params_dtype),
                requires_grad=False,
            )
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)
        self.update_param_tp_status()

    # ------------------------------------------------------------------ run

    def forward(
        self,
        input_: torch.Tensor,
        sequence_parallel_output: bool | None = None,
        **_ignored: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, Parameter | None]:
        sp = (
            self.sequence_parallel_output
            if sequence_parallel_output is None
            else sequence_parallel_output
        )
        a_local = self.input_size_per_tp_rank
        if input_.shape[-1] != a_local:
            raise ValueError(
                f"{type(self).__name__} ({self.prefix!r}): expected {a_local} input "
                f"features per TP rank, got {input_.shape[-1]}"
            )
        # vLLM hands a 2-D [T, a/P] input: no reshape (each is a dispatch of
        # host time on the small side, where the matmul is tiny).
        lead = None if input_.dim() == 2 else input_.shape[:-1]
        x = input_ if lead is None else input_.reshape(-1, a_local)
        if self.adaptive_tokens > 0:
            # The branch on the token count lives inside one custom op, so
            # torch.compile neither guards on it nor recompiles per side.
            if torch.compiler.is_compiling():
                out = torch.ops.vllm_ascend_ext.flashcomm2_adaptive_oproj(
                    x, self.runtime.index, sp)
            else:
                out = adaptive_oproj(self, x, sp)
            bias = None  # skip_bias_add is refused with the switch (see __init__)
        else:
            out, bias = self.forward_flashcomm2(x, sp)
        if not sp and lead is not None:
            out = out.reshape(*lead, self.output_size)
        if not self.return_bias:
            return out
        return out, bias

    def forward_flashcomm2(
        self, x: torch.Tensor, sp: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 1-7 on ``x`` ``[T, a/P]``: the output (``[T, h]``, or this
        rank's token block with ``sp``) and the bias for skip_bias_add callers."""
        a_local = self.input_size_per_tp_rank
        P, k, D = self.flashcomm2_tp_size, self.otp_size, self.odp_size
        # (1) Traced, no branch on the pad amount: the token count is symbolic
        # and a branch would specialise the graph on T % P (inductor fuses the
        # pad). Eager (o_shared, Ascend, the adaptive op), no copy when T % P == 0.
        num_tokens = x.shape[0]
        padded = padded_token_count(num_tokens, P)
        if torch.compiler.is_compiling() or padded != num_tokens:
            x = F.pad(x, (0, 0, 0, padded - num_tokens))
        chunk_rows = padded // P * k

        # (2)+(3): chunk i -> ODP rank i; back: D chunks of [k*blk, a/P].
        send = permute_blocks_for_all_to_all(x, P, k)
        rt = self.runtime
        in_ring = rt.ring is not None
        int8_in = self.int8_input()
        # A static input scale is one of the layer's processed tensors, so
        # under o_shared it arrives with the weight: wait before quantizing.
        # Round-robin o_shared keeps the whole processed layer in the ring slot.
        wait_early = (rt.whole_layer_in_ring and int8_in is not None
                      and not int8_in.per_token)
        if wait_early:
            torch.ops.vllm_ascend_ext.oproj_ring_wait(send, rt.index)
        x_scale = None
        if int8_in is not None:
            send, x_scale = self._quantize_for_all_to_all(int8_in, send, chunk_rows)
        recv = all_to_all_dim0(send, self.flashcomm2_odp_group)
        x_shard = recv.view(D, chunk_rows, a_local).transpose(0, 1).reshape(
            chunk_rows, D * a_local
        )

        # (4) local matmul, with o_shared's hooks around it when registered.
        bias = self.bias
        add_bias = bias is not None and not self.skip_bias_add
        fuse_bias = add_bias and k == 1
        if in_ring:
            if not wait_early:
                torch.ops.vllm_ascend_ext.oproj_ring_wait(x_shard, rt.index)
            if bias is not None and rt.whole_layer_in_ring:
                # The bias sits in the same ring slot as the weight: the
                # prefetch below overwrites it, so keep a private copy for
                # the add after the reduction and for skip_bias_add callers.
                bias = bias.clone()
        # Rank-dependent terms (vllm-ascend's quant_bias) once per output sum.
        weights = self.matmul_layer
        if int8_in is None:
            out = apply_linear(weights, x_shard, bias if fuse_bias else None)
        else:
            out = int8_in.matmul(weights, x_shard, x_scale, bias if fuse_bias else None,
                                 x.dtype)
        if in_ring:
            torch.ops.vllm_ascend_ext.oproj_ring_prefetch(out, rt.index)

        # (5) sum the k partial products; this rank keeps token block r.
        out = reduce_scatter_dim0(out, self.flashcomm2_otp_group)
        if add_bias and not fuse_bias:
            out = out + bias  # (6) once, after the reduction

        if not sp:
            # (7) back to every token on every rank, in token order.
            out = all_gather_dim0(out, self.flashcomm2_tp_group)
            out = out[:num_tokens]
        return out, (bias if self.skip_bias_add else None)

    def forward_row_parallel(self, x: torch.Tensor, sp: bool) -> torch.Tensor:
        """The small-batch side of adaptive FlashComm2 (``ops/adaptive_oproj.py``):
        plain TP's own o_proj, kept as this layer's resident slice."""
        return run_resident_slice(self, x, sp)

    @property
    def matmul_layer(self) -> LinearBase:
        """The module FlashComm2's matmul runs: this layer, or under o_shared's
        TP-shard storage the OTP view of its slice (``ops/tp_shard/storage.py``)."""
        return self.__dict__.get(OTP_VIEW_ATTR, self)

    def int8_input(self) -> Int8Input | None:
        """The int8 route the all-to-all takes, or None (activation dtype).

        Read from the processed quant method on the first eager call and
        kept in the runtime record: it cannot change after loading, and the
        eager forward path (o_shared, Ascend) should not rebuild it per layer
        and step. While torch.compile traces, it is only read (the graph
        bakes it in)."""
        if not self.int8_all_to_all or self.odp_size == 1:
            return None  # no all-to-all to shrink
        route = self.runtime.int8_route
        if route is not UNRESOLVED:
            return route
        route = int8_input_of(self.matmul_layer)
        if not torch.compiler.is_compiling():
            self.runtime.int8_route = route
        return route

    def _quantize_for_all_to_all(
        self, int8_in: Int8Input, send: torch.Tensor, chunk_rows: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """int8 rows to send, and for per-token scales those of the rows
        this rank gets back (its own chunk ``i``: every peer's chunk ``i``
        holds the same tokens)."""
        if not int8_in.per_token:
            return int8_in.quantize_static(self.matmul_layer, send), None
        # The matmul's scale is a token's absmax over all a/k columns it
        # multiplies; the ODP peers hold those columns between them.
        absmax = all_reduce_max(per_token_absmax(send), self.flashcomm2_odp_group)
        q, scale = quantize_per_token(send, absmax)
        i = self.flashcomm2_odp_group.rank_in_group
        return q, scale[i * chunk_rows:(i + 1) * chunk_rows]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.input_size}, output_features={self.output_size}, "
            f"bias={self.bias is not None}, tp_size={self.flashcomm2_tp_size}, "
            f"otp_size={self.otp_size}, odp_size={self.odp_size}, "
            f"sequence_parallel_output={self.sequence_parallel_output}, "
            f"int8_all_to_all={self.int8_all_to_all}, "
            f"adaptive_tokens={self.adaptive_tokens}"
        )
