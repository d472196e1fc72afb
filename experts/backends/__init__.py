"""Backends found by name. Heavy imports (torch, vllm) happen only when a backend is built.

`auto` (the default) is vLLM where the engine is installed and transformers (`hf`) where it is not.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from core.errors import ConfigError, unknown

if TYPE_CHECKING:
    from core.catalog import Catalog
    from core.config import PoolConfig
    from experts.backends.base import Backend

logger = logging.getLogger("coe.backends")


def _hf_class():
    from experts.backends.hf import HFBackend

    return HFBackend


def _vllm_class():
    from experts.backends.vllm import VLLMBackend

    return VLLMBackend


def _replay_class():
    from experts.backends.replay import ReplayBackend

    return ReplayBackend


BACKENDS: dict[str, Callable[[], type]] = {"hf": _hf_class, "vllm": _vllm_class, "replay": _replay_class}
AUTO = "auto"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend_name(name: str) -> str:
    """`auto` -> `vllm` when the engine is installed, else `hf`; a registered name stays as it is."""
    if name == AUTO:
        return "vllm" if vllm_installed() else "hf"
    if name not in BACKENDS:
        raise unknown("backend", name, [AUTO, *BACKENDS])
    return name


def in_process_backend_name(name: str) -> str:
    """The backend of a one-shot run in this process (`coe ask`, `coe eval run`): `auto` is
    transformers, which answers before a vLLM engine has started (~20 s on a CPU) and leaves no
    engine process behind if the run is killed; vLLM's gain is continuous batching of a server's
    concurrent requests (`coe serve`)."""
    return "hf" if name == AUTO else name


def build_backend(name: str, catalog: Catalog, pool: PoolConfig | None = None, **options) -> Backend:
    """`pool`: the memory pool's config, for backends that keep their experts in one (hf); a
    backend whose engine manages its own memory (vllm) takes it and says what it does with it."""
    chosen = resolve_backend_name(name)
    if name == AUTO and chosen == "hf":
        logger.warning("vLLM is not installed: experts run on the transformers backend")
    cls = BACKENDS[chosen]()
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "catalog", "pool"}
    if wrong := sorted(set(options) - accepted):
        raise ConfigError(f"backend {chosen!r} has no option {', '.join(wrong)}",
                          f"its options are: {', '.join(sorted(accepted))}")
    return cls(catalog, pool=pool, **options)
