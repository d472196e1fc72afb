"""Backends found by name, and the composite backend that runs a mixed catalog. Heavy imports
(torch, vllm, openai) happen only when a backend is built.

`auto` (the default) is vLLM where the engine is installed and transformers (`hf`) where it is not.
`build_backend` returns a CompositeBackend: each expert's requests go to the backend that runs it
(remote experts to `remote`, recorded ones to `replay`, local models to the configured backend).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from core.catalog import Catalog, ExpertSpec, RecordedWeights
from core.errors import ConfigError, WeightsMissingError, unknown
from core.types import Capabilities, ExpertAnswer, GenerationRequest, StreamPiece

if TYPE_CHECKING:
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


def _remote_class():
    from experts.backends.remote import RemoteBackend

    return RemoteBackend


BACKENDS: dict[str, Callable[[], type]] = {"hf": _hf_class, "vllm": _vllm_class, "replay": _replay_class,
                                           "remote": _remote_class}
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


def runner_of(spec: ExpertSpec, local: str) -> str:
    """The backend that runs an expert: `remote` for an endpoint, `replay` for a recorded model,
    else `local` (the configured backend)."""
    if spec.is_remote:
        return "remote"
    if isinstance(spec.weights, RecordedWeights):
        return "replay"
    return local


def build_backend(name: str, catalog: Catalog, pool: PoolConfig | None = None, traces: dict | None = None,
                  **options) -> CompositeBackend:
    """The backend for a whole catalog: a CompositeBackend over one backend per kind of expert in
    it. `name` (and `options`) choose the backend of local models; remote experts run on
    `remote`, recorded ones on `replay` (given `traces`, see ReplayBackend). `pool`: the memory
    pool's config, for the local backend's tiered pool (hf: models and adapters; vllm: engines
    and adapters, moved by VLLMMover).
    An expert whose weights do not resolve (experts.weights.weights_problem) is left out, with
    a warning naming it and why (`unavailable`); every other expert runs."""
    from experts.weights import weights_problem

    chosen = resolve_backend_name(name)
    if name == AUTO and chosen == "hf":
        logger.warning("vLLM is not installed: experts run on the transformers backend")
    if options:  # checked even where no expert runs on it: a misspelt option is an error
        accepted = set(inspect.signature(BACKENDS[chosen]().__init__).parameters) - {"self", "catalog", "pool"}
        if wrong := sorted(set(options) - accepted):
            raise ConfigError(f"backend {chosen!r} has no option {', '.join(wrong)}",
                              f"its options are: {', '.join(sorted(accepted))}")
    if chosen == "replay" and traces is not None:
        options["traces"] = traces
    unavailable: dict[str, str] = {}
    groups: dict[str, list[str]] = defaultdict(list)
    for spec in catalog.experts:
        if problem := weights_problem(catalog, spec):
            unavailable[spec.name] = problem
            (logger.info if spec.optional else logger.warning)("unavailable: %s", problem)
        else:
            groups[runner_of(spec, chosen)].append(spec.name)
    backends: dict[str, Backend] = {}
    for runner, names in groups.items():
        settings = options if runner == chosen else ({"traces": traces} if runner == "replay" else {})
        backends[runner] = BACKENDS[runner]()(catalog.subset(names), pool=pool, **settings)
    return CompositeBackend(catalog, backends, {n: r for r, names in groups.items() for n in names}, unavailable, chosen)


class CompositeBackend:
    """One backend over a mixed catalog: each expert's requests go to the backend that runs it
    (`runs_on`). It offers the whole Backend protocol for every expert, whatever its backend
    offers itself: `astream` (the engine's one way in), `agenerate`, `stream`, `generate` (a
    batch mixing backends runs on each at once), `load`, `resident` (merged; a remote expert is
    `remote`), `context_length`, `capabilities` and `close`. `pool` is the configured local backend's memory pool;
    other attributes (a backend's extras: token_states, tokenizer, shutdown, reset, ...) are the
    configured backend's."""

    def __init__(self, catalog: Catalog, backends: dict[str, Backend], runs_on: dict[str, str],
                 unavailable: dict[str, str], local: str):
        self.catalog = catalog
        self.backends = backends
        self.unavailable = unavailable  # expert -> why its weights do not resolve
        self._runs_on = runs_on
        self.local = local
        self.primary = backends.get(local) or (next(iter(backends.values())) if len(backends) == 1 else None)
        self.name = local if set(backends) <= {local} else "+".join(sorted(backends))
        self._threads = ThreadPoolExecutor(max_workers=max(len(backends), 1), thread_name_prefix="coe-composite")

    def __getattr__(self, name: str):
        if name.startswith("_") or self.__dict__.get("primary") is None:
            raise AttributeError(name)
        return getattr(self.primary, name)

    @property
    def pool(self):
        """The configured local backend's tiered memory pool (None: it has none, or no local backend).
        Where other backends run experts too, a LocalPoolView of it: their experts (remote ones)
        need no memory, so pinning, announcing or loading them there is a no-op."""
        pool = getattr(self.primary, "pool", None)
        if pool is None or len(self.backends) == 1:
            return pool
        return LocalPoolView(pool, self)

    @property
    def experts(self) -> list[str]:
        """The experts it runs (those whose weights resolved when it was built)."""
        return list(self._runs_on)

    def runs_on(self, expert: str) -> str:
        """The name of the backend that runs the expert (`remote`, `replay`, `hf`, `vllm`)."""
        if expert not in self._runs_on:
            if expert in self.unavailable:
                raise WeightsMissingError(self.unavailable[expert], "see `coe experts check`")
            self.catalog.get(expert)  # an unknown name: the error lists the known ones
        return self._runs_on[expert]

    def backend_of(self, expert: str) -> Backend:
        return self.backends[self.runs_on(expert)]

    # -- residency -------------------------------------------------------------------------

    def load(self, expert: str) -> float:
        return self.backend_of(expert).load(expert)

    def resident(self) -> dict[str, str]:
        where: dict[str, str] = {}
        for backend in self.backends.values():
            where.update(backend.resident())
        return where

    def context_length(self, expert: str) -> int:
        """Tokens of prompt plus answer the expert takes (experts.weights.context_length), capped
        by its backend's own limit where it has one (vLLM's max_model_len)."""
        from experts.weights import context_length

        length = context_length(self.catalog, self.catalog.get(expert))
        cap = getattr(self.backend_of(expert), "max_model_len", None)
        return min(length, cap) if cap else length

    def capabilities(self, expert: str) -> Capabilities:
        """What the expert can do beyond plain text, as the backend that runs it says
        (experts/capabilities.py); a backend that says nothing (replay) offers plain text."""
        ask = getattr(self.backend_of(expert), "capabilities", None)
        return ask(expert) if ask is not None else Capabilities()

    # -- generation ------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        """One answer per request, in order; the requests of each backend go to it in one call,
        the backends at once. A failed call raises after the others have finished."""
        by_backend: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_backend[self.runs_on(request.expert)].append(i)
        if len(by_backend) == 1:
            return self.backends[next(iter(by_backend))].generate(requests)
        calls = {name: self._threads.submit(self.backends[name].generate, [requests[i] for i in indices])
                 for name, indices in by_backend.items()}
        answers: list[ExpertAnswer | None] = [None] * len(requests)
        failure: Exception | None = None
        for name, call in calls.items():
            try:
                for i, answer in zip(by_backend[name], call.result()):
                    answers[i] = answer
            except Exception as exc:  # the other backends' answers are still awaited
                failure = failure or exc
        if failure is not None:
            raise failure
        return answers  # type: ignore[return-value]

    async def agenerate(self, request: GenerationRequest) -> ExpertAnswer:
        backend = self.backend_of(request.expert)
        if hasattr(backend, "agenerate"):
            return await backend.agenerate(request)
        return (await asyncio.get_running_loop().run_in_executor(None, backend.generate, [request]))[0]

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        """Pieces as the expert's backend produces them (token by token where it streams), the
        last one with the complete answer; closing it stops the generation."""
        backend = self.backend_of(request.expert)
        if hasattr(backend, "astream"):
            async for piece in backend.astream(request):
                yield piece
            return
        answer = await self.agenerate(request)  # a backend without streaming (replay)
        if answer.text:
            yield StreamPiece(text=answer.text)
        yield StreamPiece(answer=answer)

    def stream(self, request: GenerationRequest) -> Iterator[StreamPiece]:
        backend = self.backend_of(request.expert)
        if hasattr(backend, "stream"):
            yield from backend.stream(request)
            return
        answer = backend.generate([request])[0]
        if answer.text:
            yield StreamPiece(text=answer.text)
        yield StreamPiece(answer=answer)

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every backend: remote clients closed, vLLM engines shut down."""
        for backend in self.backends.values():
            stop = getattr(backend, "close", None) or getattr(backend, "shutdown", None)
            if stop is not None:
                stop()
        self._threads.shutdown(wait=False)

    def shutdown(self) -> None:  # the name vLLM's backend and its callers use
        self.close()


class LocalPoolView:
    """The local backend's TieredPool, used by a caller that plans over a mixed catalog: calls name
    experts of every backend, and the pool acts on its own ones (the others run elsewhere and need
    no memory here). `state()` lists the others with their backends' residence (`remote`)."""

    def __init__(self, pool, composite: CompositeBackend):
        self._pool = pool
        self._composite = composite

    def __getattr__(self, name: str):
        return getattr(self._pool, name)

    def _own(self, names) -> list[str]:
        return [n for n in names if n in self._pool]

    def state(self):
        state = self._pool.state()
        others = {n: t for n, t in self._composite.resident().items() if n not in self._pool}
        return state.model_copy(update={"residence": {**state.residence, **others}})

    def announce(self, order):
        return self._pool.announce(self._own(order))

    def pinned(self, names):
        return self._pool.pinned(self._own(names))

    def pin(self, names, consume: bool = True):
        return self._pool.pin(self._own(names), consume=consume)

    def __contains__(self, name: str) -> bool:
        return name in self._pool

    def prefetch(self, names):
        return self._pool.prefetch(self._own(names))

    def ensure(self, name: str) -> float:
        return self._pool.ensure(name) if name in self._pool else 0.0
