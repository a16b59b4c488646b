"""FlashComm2's token bookkeeping: padding, token blocks, and the all-to-all order.

``T`` tokens are padded to ``T_pad``, a multiple of the TP size ``P``; token
block ``b`` is rows ``[b*T_pad/P, (b+1)*T_pad/P)``. All-to-all chunk ``i``
(sent to ODP rank ``i``) holds blocks ``j*D + i`` for ``j < k``. Kept apart
from the layer (``flashcomm2_oproj.py``) so that the adaptive small side
(``adaptive_oproj.py``), which the layer itself imports, uses the same
arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FlashComm2Plan",
    "flashcomm2_plan",
    "padded_token_count",
    "permute_blocks_for_all_to_all",
]


@dataclass(frozen=True)
class FlashComm2Plan:
    """Row counts of one FlashComm2 o_proj call on one TP rank."""

    num_tokens: int
    tp_size: int  # P
    otp_size: int  # k
    padded_tokens: int  # T_pad
    block_rows: int  # T_pad / P: rows per token block

    @property
    def odp_size(self) -> int:
        return self.tp_size // self.otp_size

    @property
    def pad_rows(self) -> int:
        return self.padded_tokens - self.num_tokens

    @property
    def chunk_rows(self) -> int:
        """Rows of one all-to-all chunk (one per ODP peer): k blocks."""
        return self.otp_size * self.block_rows

    def chunk_blocks(self, odp_rank: int) -> list[int]:
        """Token blocks in all-to-all chunk ``odp_rank``, in the order sent."""
        D = self.odp_size
        return [j * D + odp_rank for j in range(self.otp_size)]

    @property
    def all_to_all_send_rows(self) -> list[int]:
        """Rows sent to each ODP rank (including the chunk a rank keeps)."""
        return [self.chunk_rows] * self.odp_size

    @property
    def matmul_rows(self) -> int:
        return self.chunk_rows

    @property
    def reduce_scatter_rows(self) -> tuple[int, int]:
        """(input rows, output rows) of the OTP reduce-scatter (equal if k = 1)."""
        return self.chunk_rows, self.block_rows

    @property
    def all_gather_rows(self) -> tuple[int, int]:
        """(input rows, output rows) of the TP all-gather."""
        return self.block_rows, self.padded_tokens


def padded_token_count(num_tokens: int, tp_size: int) -> int:
    """``num_tokens`` rounded up to a multiple of ``tp_size`` (works on SymInts)."""
    return (num_tokens + tp_size - 1) // tp_size * tp_size


def flashcomm2_plan(num_tokens: int, tp_size: int, otp_size: int) -> FlashComm2Plan:
    """Padding and block sizes for ``num_tokens`` tokens over TP ``tp_size``, OTP ``otp_size``."""
    if tp_size < 1 or otp_size < 1 or tp_size % otp_size:
        raise ValueError(
            f"o_proj TP size {otp_size} must be a positive divisor of TP size {tp_size}"
        )
    padded = padded_token_count(num_tokens, tp_size)
    return FlashComm2Plan(num_tokens, tp_size, otp_size, padded, padded // tp_size)


def permute_blocks_for_all_to_all(x: torch.Tensor, tp_size: int, otp_size: int) -> torch.Tensor:
    """Reorder the ``P`` token blocks of ``x`` (rows a multiple of ``P``) for the all-to-all.

    Block ``j*D + i`` moves to slot ``i*k + j``: all-to-all chunk ``i`` then
    holds blocks ``j*D + i`` for ``j < k`` (see :meth:`FlashComm2Plan.chunk_blocks`).
    """
    k, D = otp_size, tp_size // otp_size
    if k == 1:
        return x.contiguous()
    rows, cols = x.shape
    blk = rows // tp_size
    return x.view(k, D, blk, cols).transpose(0, 1).contiguous().view(rows, cols)
