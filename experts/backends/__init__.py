"""Backends found by name. Heavy imports (torch, vllm) happen only when a backend is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from orchestrator.errors import unknown

if TYPE_CHECKING:
    from experts.backends.base import Backend
    from experts.catalog import Catalog
    from orchestrator.config import PoolConfig


def _hf(catalog: Catalog, **options) -> Backend:
    from experts.backends.hf import HFBackend

    return HFBackend(catalog, **options)


def _replay(catalog: Catalog, **options) -> Backend:
    from experts.backends.replay import ReplayBackend

    return ReplayBackend(catalog, **options)


BACKENDS: dict[str, Callable[..., Backend]] = {"hf": _hf, "replay": _replay}


def build_backend(name: str, catalog: Catalog, pool: PoolConfig | None = None, **options) -> Backend:
    """`pool`: the memory pool's config, for backends that keep their experts in one."""
    if name not in BACKENDS:
        raise unknown("backend", name, BACKENDS)
    return BACKENDS[name](catalog, pool=pool, **options)
