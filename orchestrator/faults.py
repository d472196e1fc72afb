"""Fault injection: a Backend wrapper that makes chosen experts fail a given fraction of the time.

Off by default; turned on by the config's `faults` section, for tests and the load test
(evals/bench_load.py) to prove that retries, fallback and cooldown keep answering.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator

from core.config import FaultConfig
from core.types import GenerationRequest, StreamPiece
from experts.backends.base import Backend


class InjectedFault(RuntimeError):
    """The failure the fault injector raises (never raised outside fault injection)."""


class InjectedTimeout(InjectedFault, TimeoutError):
    pass


class FaultyBackend:
    """Every call for a targeted expert fails with probability `rate`."""

    def __init__(self, backend: Backend, faults: FaultConfig):
        self.backend = backend
        self.faults = faults
        self.name = backend.name
        self.injected = 0
        self._random = random.Random(faults.seed)
        self._lock = threading.Lock()

    def _maybe_fail(self, experts: set[str]) -> None:
        targeted = sorted(experts & set(self.faults.experts)) if self.faults.experts else sorted(experts)
        if not targeted:
            return
        with self._lock:
            fail = self._random.random() < self.faults.rate
            self.injected += fail
        if not fail:
            return
        if self.faults.mode == "timeout":
            time.sleep(self.faults.delay_seconds)
            raise InjectedTimeout(f"injected timeout in {targeted[0]} after {self.faults.delay_seconds:g} s")
        raise InjectedFault(f"injected failure in {targeted[0]}")

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        await asyncio.to_thread(self._maybe_fail, {request.expert})  # an injected timeout sleeps off the loop
        async for piece in self.backend.astream(request):
            yield piece

    def load(self, expert: str) -> float:
        return self.backend.load(expert)

    def resident(self) -> dict[str, str]:
        return self.backend.resident()

    def __getattr__(self, name: str):  # backend extras (tokenizer, token_states) pass through
        if name == "backend":
            raise AttributeError(name)
        return getattr(self.backend, name)


def with_faults(backend: Backend, faults: FaultConfig | None) -> Backend:
    return FaultyBackend(backend, faults) if faults is not None and faults.rate > 0 else backend
