"""The Ray Serve application.

    HTTP -> CoeIngress (the FastAPI app of deploy/server.py, and in the same process the engine:
            routing, planning, fallback, aggregation; concurrent queries batched with @serve.batch)
         -> ExpertPool-<family> (one deployment per base model family: the backend holding that
            base and its LoRA experts; Serve model multiplexing with the expert as model id, so a
            request for an expert prefers a replica that already holds it)

Routing runs where the request arrives, as in Ray Serve LLM (its OpenAiIngress calls the LLMServer
deployments directly): a router deployment of its own cost a hop per request, and each Serve hop
costs CPU that a full engine loses (evals/results/bench_hot_experts.json accounts for it).

A pool's backend comes from build_backend (`auto`: vLLM where installed, else transformers); it
gets each request as it arrives, so concurrent calls share its batches (vLLM: continuous
batching in the engine; transformers: micro-batches); the family's base (vLLM: its engine)
starts with the replica, so a ready replica answers at once.

The engine reaches the pools through ServeBackend, the Backend protocol over deployment handles,
so it runs unchanged in-process and on Serve; what travels to the pools is typed
(GenerationRequest, StreamPiece, ExpertAnswer), and a Result is rendered to JSON once, by the
ingress. With `serve.expert_pools: false` the ingress runs the backend itself (one process fewer).
Replica counts, autoscaling, resources and queue bounds come from the config's `serve` section;
past the engine's admission bounds, requests get 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator

from ray import serve

from core import tracing
from core.config import CoeConfig
from core.errors import CoeError
from core.types import Capabilities, Decision, ExpertAnswer, GenerationRequest, Query, Result, StreamPiece, StreamStart
from deploy.manifests import pool_deployment_name
from deploy.server import Admission, ApiSettings, LocalPipelineClient, build_api
from experts.backends.base import complete, pool_report
from experts.capabilities import expert_capabilities
from orchestrator.feedback import FeedbackStore

APP_NAME = "coe"
logger = logging.getLogger("coe.serve")


# -- expert pools ------------------------------------------------------------------------------


class _HeldExpert:
    """What Serve's multiplexer caches per expert: the name and the load time not yet reported."""

    def __init__(self, expert: str, load_seconds: float):
        self.expert = expert
        self.unreported_load = load_seconds

    def take_load_seconds(self) -> float:
        seconds, self.unreported_load = self.unreported_load, 0.0
        return seconds


@serve.deployment  # settings: the config's serve section (build_app), as in the generated deployment files
class ExpertPool:
    """The experts of one base family on one backend; each request is multiplexed on its expert,
    so it prefers a replica that already holds it. Requests in flight share the backend's
    batches (vLLM: continuous batching; transformers: micro-batches)."""

    def __init__(self, config: dict, family: str, models_per_replica: int = 8):
        from experts.backends import build_backend

        settings = CoeConfig.model_validate(config)
        tracing.configure(settings.serve.tracing)
        self.family = family
        self.backend = build_backend(settings.backend.name, settings.load_catalog(), pool=settings.pool,
                                     **settings.backend.options)
        self.backend.load(family)  # ready means ready to answer: the base (vLLM: ~30 s of engine start) now

        async def hold(expert: str) -> _HeldExpert:
            seconds = await asyncio.get_running_loop().run_in_executor(None, self.backend.load, expert)
            return _HeldExpert(expert, seconds)

        # Built here, not as a decorator, so that the number of experts held comes from the config.
        self._hold = serve.multiplexed(max_num_models_per_replica=models_per_replica)(hold)

    async def load(self) -> float:
        held = await self._hold(serve.get_multiplexed_model_id())
        return held.take_load_seconds()

    async def generate(self, request: GenerationRequest) -> ExpertAnswer:
        with tracing.span("pool", carrier=request.trace, expert=request.expert, family=self.family):
            await self._hold(serve.get_multiplexed_model_id())
            return await complete(self.backend, request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        with tracing.span("pool", carrier=request.trace, expert=request.expert, family=self.family, stream=True):
            await self._hold(serve.get_multiplexed_model_id())
            async for piece in self.backend.astream(request):
                yield piece

    def report(self) -> dict:
        return pool_report(self.backend, where=f"{self.family}/{serve.get_replica_context().replica_id.unique_id}")


class ServeBackend:
    """The Backend protocol over the expert-pool deployments: each request goes to its expert's
    family pool with multiplexed_model_id = the expert (a streamed one as a streaming call)."""

    name = "serve"
    pool = None  # each pool replica holds its own experts; Serve's multiplexing routes to them

    def __init__(self, catalog, pools: dict, timeout_s: float | None = None, app_name: str | None = None,
                 runs_on: str = "hf"):
        """`runs_on`: the pools' backend (`vllm`, `hf`), which decides the experts' capabilities."""
        self.catalog = catalog
        self.pools = pools
        self.runs_on = runs_on
        self.timeout_s = timeout_s  # a pool replica that never comes back fails the load, never hangs it
        self.app_name = app_name
        self._seen: set[str] = set()
        self._running: dict[str, int] = {}  # running replicas per pool deployment that has had one
        self._started: set[str] = set()
        self._refreshed_at = 0.0
        if app_name is not None:
            threading.Thread(target=self._watch_replicas, name="coe-pool-status", daemon=True).start()

    def _pool(self, expert: str, **options):
        family = self.catalog.get(expert).base
        if self.app_name is not None and not self._replicas_running(family):
            raise PoolUnavailableError(f"no replica of {pool_deployment_name(family)} is running (its node may be gone)",
                                       "retry in a moment: Serve starts a replica where there is room")
        return self.pools[family].options(multiplexed_model_id=expert, **options)

    def _replicas_running(self, family: str) -> bool:
        """Whether the family's pool has a running replica (Serve's status, looked at every
        second on a thread of its own): with none, a call would wait in Serve's queue until the
        timeout; failing at once lets the engine fall back, or answer 503, right away. A pool
        never seen running is still starting (Serve queues its calls), and a view saying none
        runs is looked at again before a call fails on it: a replica may have just come back."""
        name = pool_deployment_name(family)
        if self._running.get(name, 1) > 0:
            return True
        if time.monotonic() - self._refreshed_at > RECHECK_AFTER_S:  # a lost pool's calls share one look
            self._refresh_status()
        return self._running.get(name, 1) > 0

    def _refresh_status(self) -> None:
        self._refreshed_at = time.monotonic()
        try:
            deployments = serve.status().applications[self.app_name].deployments
        except Exception:  # the controller is busy or restarting: keep the last view
            logger.debug("serve status unavailable", exc_info=True)
            return
        running = {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()}
        self._started |= {name for name, count in running.items() if count > 0}
        # Only pools that have run count as lost: one still starting is waited for.
        self._running = {name: count for name, count in running.items() if name in self._started}

    def _watch_replicas(self) -> None:
        while True:
            self._refresh_status()
            time.sleep(STATUS_EVERY_S)

    def load(self, expert: str) -> float:
        """The first use of an expert loads it on a pool replica and reports the time; later uses
        skip the round trip (a replica that evicted it meanwhile reloads it inside the call)."""
        if expert in self._seen:
            return 0.0
        seconds = self._pool(expert).load.remote().result(timeout_s=self.timeout_s)
        self._seen.add(expert)
        return seconds

    def resident(self) -> dict[str, str]:
        return {}

    def capabilities(self, expert: str) -> Capabilities:
        return expert_capabilities(self.catalog, self.catalog.get(expert), self.runs_on)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        if request.stream:
            async for piece in self._pool(request.expert, stream=True).stream.remote(request):
                yield piece
        else:
            yield StreamPiece(answer=await self._pool(request.expert).generate.remote(request))


class PoolUnavailableError(CoeError):
    """An expert's pool has no running replica: the expert's failure (fallback, else 503)."""

    status_code = 503


STATUS_EVERY_S = 1.0
RECHECK_AFTER_S = 0.25


def serve_backend(config: CoeConfig, pools: dict):
    """The engine's backend: local experts through their family's pool deployment; remote ones
    straight from the ingress (they need no pool); both behind one CompositeBackend."""
    from experts.backends import CompositeBackend, build_backend, resolve_backend_name

    catalog = config.load_catalog()
    local = ServeBackend(catalog, pools, config.resilience.timeout_seconds, serve.get_replica_context().app_name,
                         resolve_backend_name(config.backend.name))
    served = {e.name for e in catalog.experts if e.base in pools}
    remote_names = [e.name for e in catalog.experts if e.is_remote]
    backends, runs_on = {"serve": local}, dict.fromkeys(served, "serve")
    if remote_names:
        remote = build_backend("remote", catalog.subset(remote_names))
        backends.update(remote.backends)
        runs_on.update({n: remote.runs_on(n) for n in remote_names if n not in remote.unavailable})
    unavailable = {e.name: "its weights did not resolve where the app was built" for e in catalog.experts
                   if e.name not in runs_on}
    return CompositeBackend(catalog, backends, runs_on, unavailable, "serve")


# -- engine ------------------------------------------------------------------------------------


class ReloadSignal:
    """How many reloads were asked for (by POST /v1/admin/reload or SIGHUP to `coe serve`): one
    named actor per app; every ingress replica polls it and reloads when it grows."""

    def __init__(self):
        self.generation = 0

    def bump(self) -> int:
        self.generation += 1
        return self.generation

    def current(self) -> int:
        return self.generation


def reload_signal(app_name: str):
    import ray

    actor = ray.remote(num_cpus=0)(ReloadSignal)
    return actor.options(name=f"coe-reload-{app_name}", namespace="coe", get_if_exists=True, lifetime="detached").remote()


RELOAD_POLL_SECONDS = 1.0


class SharedSessions:
    """The conversations' experts in one Ray actor that every ingress replica of the app reaches
    (orchestrator/sessions.py's store, shared)."""

    def __init__(self, settings, app_name: str):
        import ray

        from orchestrator.sessions import Sessions

        actor = ray.remote(num_cpus=0)(Sessions)
        self.actor = actor.options(name=f"coe-sessions-{app_name}", namespace="coe", get_if_exists=True,
                                   lifetime="detached").remote(settings)

    def get(self, sessions: list[str]) -> dict[str, str]:
        import ray

        return ray.get(self.actor.get.remote(sessions))

    def put(self, experts: dict[str, str]) -> None:
        self.actor.put.remote(experts)


BATCH_SIZE = 16
BATCH_WAIT_S = 0.002


class ServePipelineClient:
    """The PipelineClient of deploy/server.py inside an ingress replica: the engine (routing,
    planning, fallback, aggregation) runs in this process, as Ray Serve LLM's OpenAiIngress calls
    its LLMServer deployments directly; only the experts' generation crosses to the pool
    deployments. Concurrent chat requests share batches (@serve.batch); every request the engine
    works on holds an admission slot."""

    def __init__(self, settings: CoeConfig, pools: dict | None):
        from experts.backends import resolve_backend_name
        from orchestrator.pipeline import Pipeline

        app_name = serve.get_replica_context().app_name
        backend = serve_backend(settings, pools) if pools else None
        self.pipeline = Pipeline.from_config(settings, backend=backend, sessions=SharedSessions(settings.sessions, app_name))
        self.local = LocalPipelineClient(self.pipeline, resolve_backend_name(settings.backend.name))
        if not pools:  # the backend runs here: start the default expert now (vLLM: its engine), not in a request
            self.pipeline.backend.load(self.pipeline.catalog.default_expert)
        self.admission = Admission(settings.serve.admission.max_running, settings.serve.admission.max_waiting,
                                   settings.serve.retry_after_seconds)
        self._reloads = reload_signal(app_name)
        self._generation = 0
        self._watch = None

    async def _watch_reloads(self) -> None:
        """Reload when the app's reload signal grows (checked every second, between batches)."""
        while True:
            await asyncio.sleep(RELOAD_POLL_SECONDS)
            try:
                generation = await self._reloads.current.remote()
                if generation > self._generation:
                    self._generation = generation
                    report = await asyncio.get_running_loop().run_in_executor(None, self.pipeline.reload)
                    logger.info(json.dumps({"event": "reload", "generation": generation, **report}))
            except Exception:  # a failed reload keeps the routing that serves now
                logger.exception("reload failed; the previous routing stays")

    def _watching(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_reloads())

    async def models(self) -> dict:
        self._watching()
        return await self.local.models()

    async def route(self, query: Query) -> Decision:
        self._watching()
        async with self.admission.slot():
            return await self.local.route(query)

    async def reload(self) -> dict:
        """Ask every ingress replica of the app to reload (they poll the signal); returns at once."""
        self._watching()
        generation = await self._reloads.bump.remote()
        return {"generation": generation, "status": "accepted: every ingress replica reloads within a second or two"}

    async def chat(self, query: Query) -> Result:
        """One query in, its Result out (or its error raised); concurrent calls share one batch."""
        self._watching()
        self.pipeline.resolve_policy(query.policy)  # fail this request alone, never its batch
        async with self.admission.slot():
            result = await self._run_batch(query)
        if isinstance(result, BaseException):
            raise result
        return result

    # Up to 8 batches in flight at once: the engine loop interleaves them, and a continuously
    # batching engine merges their requests (with one or two at a time, measured on vLLM pools at
    # 8 clients, requests queued 1.6 s before the engine while the engine had room).
    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S, max_concurrent_batches=8)
    async def _run_batch(self, queries: list[Query]) -> list[Result | CoeError]:
        return await self.pipeline.arun(queries, return_errors=True)

    async def chat_stream(self, query: Query) -> AsyncIterator[StreamStart | StreamPiece | Result]:
        self._watching()
        async with self.admission.slot():
            async for event in self.local.chat_stream(query):
                yield event

    async def embed(self, texts: list[str]):
        """The routing embedder's vectors (/v1/embeddings): this replica holds it for routing."""
        async with self.admission.slot():
            return await self.local.embed(texts)

    async def pool_reports(self) -> list[dict]:
        pools = getattr(self.pipeline.backend, "pools", None)  # a ServeBackend, maybe wrapped for fault injection
        if pools:  # one replica of each family's pool answers
            return list(await asyncio.gather(*(pool.report.remote() for pool in pools.values())))
        return [pool_report(self.pipeline.backend, where=f"ingress/{serve.get_replica_context().replica_id.unique_id}")]


# -- ingress -----------------------------------------------------------------------------------


@serve.deployment
@serve.ingress()
class CoeIngress:
    """The HTTP app and the engine behind it; its keys' limits, budgets and usage live in one Ray
    actor that every ingress replica shares (deploy/keys.py)."""

    def __init__(self, config: dict, pools: dict | None = None):
        from deploy.keys import KeyGate

        settings = CoeConfig.model_validate(config)
        tracing.configure(settings.serve.tracing)
        self.client = ServePipelineClient(settings, pools)
        self.settings = ApiSettings(log_prompts=settings.serve.log_prompts)
        self.gate = KeyGate.from_config(settings, shared=True)
        self.cache = response_cache(settings)
        self.feedback = FeedbackStore.from_config(settings.feedback) if settings.feedback.enabled else None

    def __serve_build_asgi_app__(self):
        return build_api(self.client, self.settings, self.gate, self.cache, self.feedback)


def response_cache(config: CoeConfig):
    """The ingress's response cache, if configured (semantic matching embeds with the routing embedder)."""
    if not config.serve.cache.enabled:
        return None
    from deploy.cache import ResponseCache

    embed = None
    if config.serve.cache.semantic_threshold is not None:
        from routers.embedder import shared_embedder

        embed = shared_embedder().embed
    return ResponseCache(config.serve.cache, embed)


def build_app(config: CoeConfig):
    """The application graph from one coe config: the ingress (with the engine) -> a pool per base family."""
    serve_settings = config.serve
    raw = config.model_dump(mode="json")
    pools = None
    if serve_settings.expert_pools:
        from experts.weights import weights_available

        catalog = config.load_catalog()
        # A pool per family of local experts whose weights resolve (remote ones run from the ingress).
        families = sorted({e.base for e in catalog.experts if not e.is_remote and weights_available(catalog, e)})
        pools = {}
        for family in families:
            settings = serve_settings.pool(family)
            pools[family] = ExpertPool.options(name=pool_deployment_name(family), **settings.serve_options()).bind(
                raw, family, settings.models_per_replica)
    # The keys are read where the app is built (COE_API_KEYS of this process: the head node on a cluster).
    raw["serve"]["api_keys"] = serve_settings.effective_api_keys()
    return CoeIngress.options(**serve_settings.ingress.serve_options()).bind(raw, pools)


def start(config: CoeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
          name: str = APP_NAME, route_prefix: str | None = None):
    """Start Ray (locally, unless already connected to a cluster) and run the app; returns its URL."""
    init_ray(config)
    serve.start(http_options={"host": host, "port": port}, proxy_location=config.serve.proxy_location)
    prefix = route_prefix or config.serve.route_prefix
    serve.run(build_app(config), name=name, route_prefix=prefix, blocking=blocking)
    return f"http://{host}:{port}{prefix.rstrip('/')}"


def init_ray(config: CoeConfig) -> None:
    """A local Ray, unless this process is connected to one already. ray.init replaces the
    process's SIGTERM handler with its own (sys.exit, which aborts a stop half-way): a Python
    handler the process had is put back, so the caller's own stop runs; a process without one
    keeps Ray's."""
    import signal

    import ray

    if ray.is_initialized():
        return
    own_handler = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=config.serve.num_cpus, include_dashboard=False, log_to_driver=False)
    if callable(own_handler) and signal.getsignal(signal.SIGTERM) is not own_handler:
        signal.signal(signal.SIGTERM, own_handler)


def stop() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()


class _Stop(Exception):
    pass


def ray_get(ref):
    import ray

    return ray.get(ref)


def run_forever(config: CoeConfig, host: str, port: int) -> None:
    """`coe serve`: until Ctrl-C or SIGTERM, which stop Serve and the local Ray with every process
    they started. Killed harder (SIGKILL), the reaper takes the local Ray cluster and the engines
    along (experts/reaper.py)."""
    import signal

    from experts import reaper

    def stop_serving(signum, frame):
        raise _Stop()

    def reload(signum, frame):  # SIGHUP: every ingress replica reads the catalog and router folders again
        generation = reload_signal(APP_NAME).bump.remote()
        print(f"coe: reload {ray_get(generation)} asked for", flush=True)

    signal.signal(signal.SIGTERM, stop_serving)
    signal.signal(signal.SIGHUP, reload)
    reaper.watch()
    try:
        url = start(config, host, port)
        print(f"coe is serving the OpenAI-compatible API at {url}/v1  (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while stopping ends it at once
        stop()


def app_builder(args: dict | None = None):
    """Entry point for `serve run deploy/serve_config.yaml` and `serve deploy`: args is a coe config."""
    return build_app(CoeConfig.model_validate(args or {}))
