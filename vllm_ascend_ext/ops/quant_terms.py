"""On which rank a quant method adds its per-layer additive terms.

A row-parallel linear's output is a sum of partial products over ranks, so a
per-layer additive term (a bias; vllm-ascend W8A8-static's ``quant_bias``)
must enter each output sum exactly once:

- plain TP: the sum runs over the TP group; TP rank 0 adds the term;
- FlashComm2, ``k = 1``: every ODP rank computes whole output rows for its
  own tokens, so *every* rank adds the term;
- FlashComm2, ``k > 1``: the rows are summed over the OTP group by the
  reduce-scatter; OTP rank 0 adds the term.

vLLM's own quant methods take no rank (the layer adds ``bias`` itself), but
vllm-ascend's ``AscendLinearMethod`` (``quantization/method_adapters.py``,
``apply``; lines 138-153 at v0.25.1rc1, 138-154 at main) derives it for any
``RowParallelLinear`` from the *global* TP group and passes it to its scheme
(``scheme.apply(layer, x, bias, tp_rank)``; W8A8-static adds ``quant_bias``
when ``tp_rank == 0``). Our o_proj is a ``RowParallelLinear`` subclass, so
that question would get plain TP's answer: under FlashComm2 ``k = 1`` the
tokens of TP ranks 1.. would miss ``quant_bias``. :func:`apply_linear` asks the
scheme directly with the FlashComm2 rank instead. It acts only on that class
(vllm-ascend's own pattern: it keys its o_proj prefetch by class name too),
which exists only where vllm-ascend is installed; every other method is
called as vLLM calls it.
"""

from __future__ import annotations

from typing import Any

import torch

#: vllm-ascend's linear-method wrapper (quantization/method_adapters.py).
ASCEND_LINEAR_METHOD = "AscendLinearMethod"


def additive_term_rank(layer: Any) -> int:
    """The rank to report to a scheme that adds its terms on "rank 0":
    0 on every rank for ``k = 1``, the OTP rank for ``k > 1``."""
    return 0 if layer.otp_size == 1 else layer.tp_rank


def takes_rank(quant_method: Any) -> bool:
    """vllm-ascend's wrapper, whose scheme's ``apply`` takes ``tp_rank``."""
    return (type(quant_method).__name__ == ASCEND_LINEAR_METHOD
            and getattr(quant_method, "quant_method", None) is not None)


def apply_linear(layer: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``layer.quant_method.apply(layer, x, bias)``, with rank-dependent terms
    placed by the FlashComm2 rule above."""
    method = layer.quant_method
    if takes_rank(method):
        return method.quant_method.apply(layer, x, bias, additive_term_rank(layer))
    return method.apply(layer, x, bias)
