"""What the CPU is: its model name and the vector extensions that decide both how fast a model runs
on it (with AVX512-BF16 or AMX bf16 is the fast dtype: experts/backends/dtype.py) and which kernels
a runtime picks, so which float roundings its results carry (the embedding cache is keyed by them:
routers/embedder.py)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

VECTOR_EXTENSIONS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo(*fields: str) -> str | None:
    """The value of the first /proc/cpuinfo line naming one of `fields`; None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(fields):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


@functools.cache
def cpu_extensions() -> tuple[str, ...] | None:
    """The extensions of VECTOR_EXTENSIONS this CPU has; None where /proc/cpuinfo is not there."""
    flags = _cpuinfo("flags", "Features")
    return None if flags is None else tuple(name for name in VECTOR_EXTENSIONS if name in flags.split())
