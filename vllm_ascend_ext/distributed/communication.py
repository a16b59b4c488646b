"""Collectives of the FlashComm2 o_proj as torch custom ops.

torch.compile cannot trace a ``GroupCoordinator`` argument, so -- like vLLM's
own ``torch.ops.vllm.all_gather`` -- each op takes the coordinator's
``unique_name`` and looks the coordinator up in vLLM's group registry at run
time.  The real implementations run on the coordinator's ``device_group``
(gloo on CPU, HCCL on Ascend, NCCL on CUDA); the fake implementations only
describe the output shape.

The first three work on dim 0 with equal splits:

* ``flashcomm2_all_to_all(x, group_name)``: chunk ``i`` of ``x`` goes to group
  rank ``i``; chunk ``i`` of the result came from group rank ``i``.
* ``flashcomm2_reduce_scatter(x, world_size, group_name)``: sum over the
  group, group rank ``r`` keeps rows ``[r*n/ws, (r+1)*n/ws)``.
* ``flashcomm2_all_gather(x, world_size, group_name)``: concatenation of every
  group rank's ``x`` in group-rank order.

``flashcomm2_all_reduce_max(x, group_name)`` is the elementwise maximum over
the group (the int8 all-to-all agrees on per-token scales with it).

Which path each collective takes (chosen per op from the group):

* all-to-all: on gloo, a pairwise exchange (:func:`all_to_all_is_pairwise`
  says why); any other backend (HCCL, NCCL) its native ``all_to_all_single``.
  No device communicator vLLM or vllm-ascend ships offers a plain all-to-all
  (vLLM CPU's shared-memory kernels have none either).
* all-gather: on a CPU group that vLLM gave its shared-memory communicator
  (the TP group, when all its ranks share one node), vLLM's shared-memory
  all-gather -- the path vLLM's own TP all-gather takes there -- for the
  dtypes those kernels handle; otherwise ``torch.distributed``.
* reduce-scatter and all-reduce(MAX): ``torch.distributed``.  vLLM CPU's
  communicator has no shared-memory reduce-scatter (it calls the same gloo
  reduce-scatter) and its shared-memory all-reduce only sums; vllm-ascend's
  NPU communicator calls the same HCCL collectives as these ops do.
* CUDA: vLLM's communicator would send reduce-scatter and all-gather through
  pynccl or NVLS symmetric memory; not taken, because nothing here can run
  it and this plugin's targets are Ascend and CPU.

Our OTP / ODP groups get vLLM's CPU communicator but never its shared-memory
path (vLLM grants that only to groups named ``tp*`` / ``pp*``), and they need
none: none of their collectives (all-to-all, all-reduce(MAX), reduce-scatter)
has a shared-memory kernel.

For tests, :func:`set_poison_outputs` makes every op fill its freshly
allocated output with NaN before the collective writes it, so a region the
collective fails to write cannot pass for data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from vllm_ascend_ext.compat import CPU_SHM_DTYPES, cpu_shm_collectives
from vllm_ascend_ext.custom_ops import register_custom_op

__all__ = [
    "all_gather_dim0",
    "all_reduce_max",
    "all_to_all_dim0",
    "all_to_all_is_pairwise",
    "lookup_group",
    "poison_outputs_enabled",
    "reduce_scatter_dim0",
    "set_poison_outputs",
]

_poison = False

# torch 2.13 renamed the tensor-in/tensor-out collectives; older torch builds
# (e.g. the one torch_npu pins) only have the old names.
_reduce_scatter_impl = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_impl = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def set_poison_outputs(enabled: bool) -> None:
    """Test aid: NaN-fill collective outputs before they are written."""
    global _poison
    _poison = bool(enabled)


def poison_outputs_enabled() -> bool:
    return _poison


def _new_output(shape: list[int] | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def lookup_group(group_name: str) -> Any:
    """The live ``GroupCoordinator`` registered under ``group_name``."""
    from vllm.distributed import parallel_state as ps

    ref = ps._groups.get(group_name)
    group = ref() if ref is not None else None
    if group is None:
        raise RuntimeError(
            f"FlashComm2: process group {group_name!r} is not registered or was "
            "destroyed (were the FlashComm2 groups torn down before the model?)"
        )
    return group


def all_to_all_is_pairwise(backend: str) -> bool:
    """Whether the all-to-all on a ``backend`` group is a pairwise exchange.

    gloo's ``all_to_all_single`` does not send both directions at once:
    across a 200 mbit link, 4 MiB fp32, it took 171 ms for half the bytes of
    a 176 ms all_reduce, while isend/irecv of the same halves, all posted at
    once, took 89 ms = bytes / rate (FACTS.md, "Two hosts on one machine").
    HCCL and NCCL have native all-to-all kernels; they keep them.
    """
    return str(backend) == "gloo"


# --------------------------------------------------------------------------
# real implementations
# --------------------------------------------------------------------------


def _pairwise_all_to_all(out: torch.Tensor, x: torch.Tensor, group: Any) -> None:
    """``all_to_all_single(out, x)`` as one isend and one irecv per peer,
    all posted before any is waited on, so that every direction of every
    link carries its chunk at the same time; the own chunk is a local copy."""
    P, me = group.world_size, group.rank_in_group
    rows = x.shape[0] // P
    send = x.view(P, rows, *x.shape[1:])
    recv = out.view(P, rows, *x.shape[1:])
    recv[me].copy_(send[me])
    if x.numel() == 0:
        return  # same shape on every rank: nobody sends either
    pending = []
    for step in range(1, P):
        # Peers in a rotating order, so that P > 2 ranks do not all start
        # on the same peer.
        peer = (me + step) % P
        peer_rank = group.ranks[peer]
        pending.append(dist.irecv(recv[peer], src=peer_rank, group=group.device_group))
        pending.append(dist.isend(send[peer], dst=peer_rank, group=group.device_group))
    for work in pending:
        work.wait()


def _all_to_all(x: torch.Tensor, group_name: str) -> torch.Tensor:
    group = lookup_group(group_name)
    if x.shape[0] % group.world_size != 0:
        raise ValueError(
            f"flashcomm2_all_to_all: {x.shape[0]} rows do not split evenly over "
            f"{group.world_size} ranks of {group_name!r}"
        )
    x = x.contiguous()
    out = _new_output(x.shape, x)
    if all_to_all_is_pairwise(dist.get_backend(group.device_group)):
        _pairwise_all_to_all(out, x, group)
    else:
        dist.all_to_all_single(out, x, group=group.device_group)
    return out


def _reduce_scatter(x: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    group = lookup_group(group_name)
    if group.world_size != world_size or x.shape[0] % world_size != 0:
        raise ValueError(
            f"flashcomm2_reduce_scatter: {x.shape[0]} rows over world_size="
            f"{world_size} does not fit group {group_name!r} of size {group.world_size}"
        )
    x = x.contiguous()
    out = _new_output([x.shape[0] // world_size, *x.shape[1:]], x)
    _reduce_scatter_impl(out, x, group=group.device_group)
    return out


def _all_gather(x: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    group = lookup_group(group_name)
    if group.world_size != world_size:
        raise ValueError(
            f"flashcomm2_all_gather: world_size={world_size} does not match group "
            f"{group_name!r} of size {group.world_size}"
        )
    x = x.contiguous()
    out = _new_output([x.shape[0] * world_size, *x.shape[1:]], x)
    shm = cpu_shm_collectives(group)
    if shm is not None and x.dtype in CPU_SHM_DTYPES:
        shm.all_gather_into_tensor(out, x, group=group.device_group)
    else:
        _all_gather_impl(out, x, group=group.device_group)
    return out


def _all_reduce_max(x: torch.Tensor, group_name: str) -> torch.Tensor:
    group = lookup_group(group_name)
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group.device_group)
    return out


# --------------------------------------------------------------------------
# fake (meta) implementations: shapes only
# --------------------------------------------------------------------------


def _all_to_all_fake(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _reduce_scatter_fake(
    x: torch.Tensor, world_size: int, group_name: str
) -> torch.Tensor:
    return x.new_empty([x.shape[0] // world_size, *x.shape[1:]])


def _all_gather_fake(x: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    return x.new_empty([x.shape[0] * world_size, *x.shape[1:]])


def _all_reduce_max_fake(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


for _name, _impl, _fake in (
    ("flashcomm2_all_to_all", _all_to_all, _all_to_all_fake),
    ("flashcomm2_reduce_scatter", _reduce_scatter, _reduce_scatter_fake),
    ("flashcomm2_all_gather", _all_gather, _all_gather_fake),
    ("flashcomm2_all_reduce_max", _all_reduce_max, _all_reduce_max_fake),
):
    register_custom_op(_name, _impl, _fake)


# --------------------------------------------------------------------------
# callers' entry points (no-ops on single-rank groups)
# --------------------------------------------------------------------------


def all_to_all_dim0(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group.world_size == 1:
        return x
    return torch.ops.vllm_ascend_ext.flashcomm2_all_to_all(x, group.unique_name)


def reduce_scatter_dim0(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group.world_size == 1:
        return x
    return torch.ops.vllm_ascend_ext.flashcomm2_reduce_scatter(
        x, group.world_size, group.unique_name
    )


def all_gather_dim0(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group.world_size == 1:
        return x
    return torch.ops.vllm_ascend_ext.flashcomm2_all_gather(
        x, group.world_size, group.unique_name
    )


def all_reduce_max(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group.world_size == 1:
        return x
    return torch.ops.vllm_ascend_ext.flashcomm2_all_reduce_max(x, group.unique_name)
