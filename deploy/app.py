"""The Ray Serve application.

    HTTP -> CoeIngress (FastAPI app of deploy/server.py)
         -> CoeRouter (routing, planning, fallback, aggregation; batches concurrent queries
            with @serve.batch)
         -> ExpertPool-<family> (one deployment per base model family: the backend holding that
            base and its LoRA experts; Serve model multiplexing with the expert as model id, so a
            request for an expert prefers a replica that already holds it)

A pool's backend comes from build_backend (`auto`: vLLM where installed, else transformers). A
backend with `agenerate`/`astream` gets each request as it arrives, so concurrent calls share
its batches (vLLM: continuous batching in the engine; transformers: micro-batches); the family's
base (vLLM: its engine) starts with the replica, so a ready replica answers at once.

The router reaches the pools through ServeBackend, the Backend protocol over deployment handles,
so the pipeline runs unchanged in-process and on Serve. With `serve.expert_pools: false` the
router runs the backend itself (one process fewer). Replica counts, autoscaling, resources and
queue bounds come from the config's `serve` section; past a queue bound, requests get 503 with
Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.serve.exceptions import BackPressureError

from core.config import CoeConfig
from core.errors import CoeError
from core.types import ExpertAnswer, GenerationRequest, Query, StreamPiece
from deploy.server import ApiSettings, build_api, error_reply, iterate_in_thread, model_listing, pipeline_stream
from experts.backends.base import pool_report

APP_NAME = "coe"


# -- expert pools ------------------------------------------------------------------------------


class _HeldExpert:
    """What Serve's multiplexer caches per expert: the name and the load time not yet reported."""

    def __init__(self, expert: str, load_seconds: float):
        self.expert = expert
        self.unreported_load = load_seconds

    def take_load_seconds(self) -> float:
        seconds, self.unreported_load = self.unreported_load, 0.0
        return seconds


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class ExpertPool:
    """The experts of one base family on one backend. A call may mix experts of the family; its
    multiplexed model id (the expert most requested in it) steers it to a replica holding that one."""

    def __init__(self, config: dict, family: str, models_per_replica: int = 8):
        from experts.backends import build_backend

        settings = CoeConfig.model_validate(config)
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

    async def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        await self._hold(serve.get_multiplexed_model_id())
        if hasattr(self.backend, "agenerate"):  # each request as it arrives: calls share the backend's batches
            return list(await asyncio.gather(*(self.backend.agenerate(r) for r in requests)))
        return await self._batched(requests)

    # The router already batches (a call carries a family's share of a router batch); this only
    # merges calls that are queued anyway, with no waiting. Serve splits batches by model id.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(self, calls: list[list[GenerationRequest]]) -> list[list[ExpertAnswer]]:
        flat = [r for call in calls for r in call]
        answers = iter(await asyncio.get_running_loop().run_in_executor(None, self.backend.generate, flat))
        return [[next(answers) for _ in call] for call in calls]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        await self._hold(serve.get_multiplexed_model_id())
        pieces = (self.backend.astream(request) if hasattr(self.backend, "astream")
                  else iterate_in_thread(self.backend.stream(request)))
        async for piece in pieces:
            yield piece

    def report(self) -> dict:
        return pool_report(self.backend, where=f"{self.family}/{serve.get_replica_context().replica_id.unique_id}")


class ServeBackend:
    """The Backend protocol over the expert-pool deployments: each expert's requests go to its
    family's pool with multiplexed_model_id = the expert. Called from worker threads of the
    router replica (the pipeline is synchronous), never from its event loop."""

    name = "serve"

    def __init__(self, catalog, pools: dict, timeout_s: float | None = None):
        self.catalog = catalog
        self.pools = pools
        self.timeout_s = timeout_s  # a pool replica that never comes back fails the call, never hangs it
        self._seen: set[str] = set()

    def _pool(self, expert: str, **options):
        return self.pools[self.catalog.get(expert).base].options(multiplexed_model_id=expert, **options)

    def load(self, expert: str) -> float:
        """The first use of an expert loads it on a pool replica and reports the time; later uses
        skip the round trip (a replica that evicted it meanwhile reloads it inside generate)."""
        if expert in self._seen:
            return 0.0
        seconds = self._pool(expert).load.remote().result(timeout_s=self.timeout_s)
        self._seen.add(expert)
        return seconds

    def resident(self) -> dict[str, str]:
        return {}  # each pool replica holds its own experts; Serve's multiplexing routes to them

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        """One call per base family with all its experts' requests: the backend runs them in one
        batch (measured: per-expert calls made HTTP throughput no better than one query at a
        time on CPU). The call is multiplexed on the family's most requested expert."""
        by_family: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_family[self.catalog.get(request.expert).base].append(i)
        calls = []
        for members in by_family.values():
            expert = Counter(requests[i].expert for i in members).most_common(1)[0][0]
            calls.append((members, self._pool(expert).generate.remote([requests[i] for i in members])))
        answers: list[ExpertAnswer | None] = [None] * len(requests)
        for members, call in calls:
            for i, answer in zip(members, call.result(timeout_s=self.timeout_s)):
                answers[i] = answer
        return answers  # type: ignore[return-value]

    def stream(self, request: GenerationRequest) -> Iterator[StreamPiece]:
        yield from self._pool(request.expert, stream=True).stream.remote(request)


CONCURRENT_BATCHES = 8  # router batches in flight at once (see CoeRouter._run_batch)


# -- router ------------------------------------------------------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class CoeRouter:
    """Routing, planning, fallback and aggregation for batches of concurrent queries."""

    def __init__(self, config: dict, pools: dict | None = None, batch_size: int = 16, batch_wait_s: float = 0.002):
        from experts.backends import resolve_backend_name
        from orchestrator.pipeline import Pipeline

        settings = CoeConfig.model_validate(config)
        backend = ServeBackend(settings.load_catalog(), pools, settings.resilience.timeout_seconds) if pools else None
        self.pipeline = Pipeline.from_config(settings, backend=backend)
        self.backend_name = resolve_backend_name(settings.backend.name)  # what runs the experts, here or in the pools
        if not pools:  # the backend runs here: start the default expert now (vLLM: its engine), not in a request
            self.pipeline.fallback.load(self.pipeline.catalog.default_expert)
        self._run_batch.set_max_batch_size(batch_size)
        self._run_batch.set_batch_wait_timeout_s(batch_wait_s)
        self._batch_threads = ThreadPoolExecutor(CONCURRENT_BATCHES, thread_name_prefix="coe-batch")

    def models(self) -> dict:
        return model_listing(self.pipeline, self.backend_name)

    async def route(self, query: Query) -> dict:
        try:
            [decision] = await asyncio.get_running_loop().run_in_executor(None, self.pipeline.route, [query])
        except Exception as exc:
            return error_reply(exc)
        return {"decision": decision.model_dump()}

    async def chat(self, query: Query) -> dict:
        """One query in, its description or an error out; concurrent calls share one batch."""
        try:
            self.pipeline.resolve_policy(query.policy)  # fail this request alone, never its batch
        except CoeError as exc:
            return error_reply(exc)
        return await self._run_batch(query)

    # Several batches at a time, each on its own thread: a batch blocks its thread until its last
    # answer, and with two at a time (measured, vLLM pools, 8 clients) requests queued 1.6 s in the
    # router while the engine had room; a continuously batching engine merges concurrent batches,
    # and the transformers pools merge calls that queue up.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002, max_concurrent_batches=CONCURRENT_BATCHES)
    async def _run_batch(self, queries: list[Query]) -> list[dict]:
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._batch_threads, self.pipeline.run, queries, True)
        except Exception as exc:
            return [error_reply(exc)] * len(queries)
        return [error_reply(r) if isinstance(r, Exception) else {"details": {**self.pipeline.describe(r), "batch": len(queries)}}
                for r in results]

    async def chat_stream(self, query: Query) -> AsyncIterator[dict]:
        async for event in pipeline_stream(self.pipeline, query):
            yield event

    async def pool_reports(self) -> list[dict]:
        backend = self.pipeline.backend
        pools = getattr(backend, "pools", None)  # a ServeBackend, maybe wrapped for fault injection
        if pools:  # one replica of each family's pool answers
            return list(await asyncio.gather(*(pool.report.remote() for pool in pools.values())))
        return [pool_report(backend, where=f"router/{serve.get_replica_context().replica_id.unique_id}")]


# -- ingress -----------------------------------------------------------------------------------


class ServePipelineClient:
    """The PipelineClient of deploy/server.py over a handle to the router deployment. A full
    router queue (Serve's BackPressureError) becomes a 503 reply with Retry-After."""

    def __init__(self, router, retry_after: int):
        self.router = router
        self.retry_after = retry_after

    def _overloaded(self, exc: BackPressureError) -> dict:
        return {"error": "the service is at capacity; retry after a moment", "status": 503, "overloaded": True,
                "retry_after": self.retry_after}

    async def models(self) -> dict:
        return await self.router.models.remote()

    async def route(self, query: Query) -> dict:
        try:
            return await self.router.route.remote(query)
        except BackPressureError as exc:
            return self._overloaded(exc)

    async def chat(self, query: Query) -> dict:
        try:
            return await self.router.chat.remote(query)
        except BackPressureError as exc:
            return self._overloaded(exc)

    async def pool_reports(self) -> list[dict]:
        return await self.router.pool_reports.remote()

    async def chat_stream(self, query: Query) -> AsyncIterator[dict]:
        events = self.router.options(stream=True).chat_stream.remote(query)
        try:
            first = await events.__anext__()
        except BackPressureError as exc:
            yield self._overloaded(exc)
            return
        yield first
        async for event in events:
            yield event


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress()
class CoeIngress:
    def __init__(self, router, api: dict, retry_after: int = 1):
        self.client = ServePipelineClient(router, retry_after)
        self.settings = ApiSettings(**api)

    def __serve_build_asgi_app__(self):
        return build_api(self.client, self.settings)


def pool_deployment_name(family: str) -> str:
    return f"ExpertPool-{family}"


def build_app(config: CoeConfig):
    """The application graph from one coe config: ingress -> router -> a pool per base family."""
    serve_settings = config.serve
    raw = config.model_dump(mode="json")
    pools = None
    if serve_settings.expert_pools:
        from experts.weights import weights_available

        catalog = config.load_catalog()
        families = sorted({e.base for e in catalog.experts if weights_available(catalog, e)})  # no pool without weights
        pools = {}
        for family in families:
            settings = serve_settings.pool(family)
            pools[family] = ExpertPool.options(name=pool_deployment_name(family), **settings.serve_options()).bind(
                raw, family, settings.models_per_replica)
    router = CoeRouter.options(**serve_settings.router.serve_options()).bind(raw, pools)
    api = {"api_keys": serve_settings.effective_api_keys(), "log_prompts": serve_settings.log_prompts}
    return CoeIngress.options(**serve_settings.ingress.serve_options()).bind(router, api, serve_settings.retry_after_seconds)


def start(config: CoeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
          name: str = APP_NAME, route_prefix: str | None = None):
    """Start Ray (locally, unless already connected to a cluster) and run the app; returns its URL."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=config.serve.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    prefix = route_prefix or config.serve.route_prefix
    serve.run(build_app(config), name=name, route_prefix=prefix, blocking=blocking)
    return f"http://{host}:{port}{prefix.rstrip('/')}"


def stop() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()


def run_forever(config: CoeConfig, host: str, port: int) -> None:
    url = start(config, host, port)
    print(f"coe is serving the OpenAI-compatible API at {url}/v1  (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def app_builder(args: dict | None = None):
    """Entry point for `serve run deploy/serve_config.yaml` and `serve deploy`: args is a coe config."""
    return build_app(CoeConfig.model_validate(args or {}))
