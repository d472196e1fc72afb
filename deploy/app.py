"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of a pipeline deployment.

    HTTP -> CoeIngress (FastAPI, no CPU reserved) -> PipelineDeployment (router + experts; concurrent
    requests share the backend's batches) -> Result

Ray Serve replicas reserve one CPU each by default; on a 2-core machine a third replica would
never schedule, so the ingress reserves none and the pipeline one. The pipeline replica hosts the
backend: with vLLM its engine core runs in a process the replica spawns (outside Ray's CPU
accounting), which is why the replica reserves one CPU and not both.
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from deploy import metrics
from deploy.openai_api import ChatCompletionRequest, chat_completion, error_body
from orchestrator.config import CoeConfig
from orchestrator.errors import CoeError
from orchestrator.types import Query

logger = logging.getLogger("coe.serve")
APP_NAME = "coe"


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class PipelineDeployment:
    def __init__(self, config: dict):
        from orchestrator.pipeline import Pipeline

        self.pipeline = Pipeline.from_config(CoeConfig.model_validate(config))
        # Ready means ready to answer: the default expert's engine (vLLM: ~30 s) starts now, not
        # in the first request.
        self.pipeline.backend.load(self.pipeline.catalog.default_expert)

    def models(self) -> dict:
        return {"policies": self.pipeline.policies, "default_policy": self.pipeline.default_policy,
                "experts": sorted(self.pipeline.available), "backend": self.pipeline.backend.name}

    async def route(self, query: Query) -> dict:
        try:
            [decision] = self.pipeline.route([query])
        except CoeError as exc:
            return {"error": str(exc), "status": exc.status_code}
        return {"decision": decision.model_dump()}

    async def chat(self, query: Query) -> dict:
        """One query in, a completion or an error out. Concurrent calls share the backend's batches
        (vLLM: continuous batching in the engine; transformers: requests that arrive while a batch
        runs form the next one), and an error (bad adapter, prompt too long) fails its request alone.
        A client that goes away cancels this call, and the backend stops its generation."""
        try:
            result = await self.pipeline.arun(query)
        except CoeError as exc:
            return {"error": str(exc), "status": exc.status_code}
        return {"result": result, "details": self.pipeline.describe(result)}


def authorized(authorization_header: str, api_keys: list[bytes]) -> bool:
    """True with no keys configured, or with `Bearer <key>` for a configured key."""
    if not api_keys:
        return True
    scheme, _, token = authorization_header.partition(" ")
    # compare_digest against every key: the time taken does not tell how much of a key matched
    matches = [hmac.compare_digest(token.encode(), key) for key in api_keys]
    return scheme.lower() == "bearer" and any(matches)


api = FastAPI(title="coe", description="OpenAI-compatible compound expert router")


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return JSONResponse(error_body(f"{where}: {first['msg']}" if where else first["msg"], 400, param=where or None), 400)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class CoeIngress:
    def __init__(self, pipeline, api_keys: list[str], log_prompts: bool = False):
        self.pipeline = pipeline
        self.api_keys = [k.encode() for k in api_keys]
        self.log_prompts = log_prompts

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if authorized(request.headers.get("authorization", ""), self.api_keys):
            return None
        return JSONResponse(error_body("invalid or missing API key; send Authorization: Bearer <key>", 401), 401)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request):
        if denied := self._unauthorized(request):
            return denied
        info = await self.pipeline.models.remote()
        now = int(time.time())
        ids = ["coe"] + [f"coe-{p}" for p in info["policies"]] + info["experts"]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "coe"} for i in ids],
                "coe": {"backend": info["backend"]}}

    @api.post("/v1/route")
    async def route(self, body: ChatCompletionRequest, request: Request):
        """The routing decision with its explanation, without generating."""
        if denied := self._unauthorized(request):
            return denied
        reply = await self.pipeline.route.remote(body.to_query())
        if "error" in reply:
            return self._error(reply, "route")
        metrics.REQUESTS.labels("route", reply["decision"]["policy"], "200").inc()
        return reply["decision"]

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        if denied := self._unauthorized(request):
            return denied
        if body.stream:
            return JSONResponse(error_body("streaming is not supported yet; send stream=false", 400, param="stream"), 400)
        started = time.perf_counter()
        reply = await self.pipeline.chat.remote(body.to_query())
        if "error" in reply:
            return self._error(reply, "chat")
        result, details = reply["result"], reply["details"]
        seconds = time.perf_counter() - started
        policy = details["policy"]
        metrics.REQUESTS.labels("chat", policy, "200").inc()
        metrics.LATENCY.labels(policy).observe(seconds)
        for expert in result.experts:
            metrics.ROUTED.labels(policy, expert).inc()
        metrics.TOKENS.labels("prompt").inc(result.usage.prompt_tokens)
        metrics.TOKENS.labels("completion").inc(result.usage.completion_tokens)
        logger.info("chat policy=%s experts=%s tokens=%d seconds=%.3f%s", policy, ",".join(result.experts),
                    result.usage.total_tokens, seconds, f" prompt={result.decision.query_id}:{body.messages[-1].content!r}" if self.log_prompts else "")
        headers = {"x-coe-policy": policy, "x-coe-experts": ",".join(result.experts)}
        return JSONResponse(chat_completion(result, body.model, details), headers=headers)

    @staticmethod
    def _error(reply: dict, endpoint: str) -> JSONResponse:
        metrics.REQUESTS.labels(endpoint, "-", str(reply["status"])).inc()
        return JSONResponse(error_body(reply["error"], reply["status"], param="model"), reply["status"])


def build_app(config: CoeConfig):
    pipeline = PipelineDeployment.bind(config.model_dump(mode="json"))
    return CoeIngress.bind(pipeline, config.serve.effective_api_keys(), config.serve.log_prompts)


def start(config: CoeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False):
    """Start Ray (locally, unless already connected to a cluster) and run the app; returns its URL."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=config.serve.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix=config.serve.route_prefix, blocking=blocking)
    return f"http://{host}:{port}"


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
