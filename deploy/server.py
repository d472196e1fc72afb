"""The OpenAI-compatible HTTP API as a plain FastAPI app over a PipelineClient (no Ray here).

On Serve, the ingress deployment builds this app over handles to the router deployment
(deploy/app.py); in tests and benchmarks it can run in-process over a Pipeline (LocalPipelineClient).
What comes back from the pipeline is typed (Decision, StreamStart, StreamPiece, Result, CoeError)
and rendered here once: the OpenAI body, the routing headers and the metrics.
Every error leaves in the OpenAI error format with its status code: 400 bad input, 401 no key,
404 unknown model or path, 413 body too large, 503 overload (with Retry-After) or failing experts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import tracing
from core.errors import CoeError, InternalError, OverloadedError, UnknownNameError
from core.types import Decision, Query, Result, StreamPiece, StreamStart
from deploy import metrics
from deploy.cache import ResponseCache
from deploy.keys import KeyDenied, KeyGate, estimate_tokens
from deploy.openai_api import (
    DONE,
    ChatCompletionRequest,
    FeedbackRequest,
    chat_completion,
    chunk,
    describe,
    error_body,
    observe,
    response_id,
    routing_headers,
    usage_chunk,
)
from deploy.ui import add_ui
from experts.backends.base import pool_report
from orchestrator.feedback import FeedbackStore

logger = logging.getLogger("coe.serve")
POOL_REPORT_TIMEOUT_S = 5.0


class ApiError(Exception):
    """An error for the client, in the OpenAI format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    @classmethod
    def of(cls, exc: CoeError) -> ApiError:
        unknown_model = isinstance(exc, UnknownNameError)
        return cls(exc.status_code, str(exc), param="model" if unknown_model else None,
                   code="model_not_found" if unknown_model else "overloaded" if isinstance(exc, OverloadedError) else None,
                   retry_after=getattr(exc, "retry_after", None))

    def response(self) -> JSONResponse:
        headers = {"retry-after": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(error_body(self.message, self.status, self.param, self.code), self.status, headers=headers)


def as_coe_error(exc: BaseException) -> CoeError:
    """What the client may hear of a failure: a CoeError as it is; anything else is a bug, logged
    here with its traceback and answered as a bare 500."""
    if isinstance(exc, CoeError):
        return exc
    logger.error("internal error", exc_info=exc)
    return InternalError(f"internal error ({type(exc).__name__}); see the server log")


class PipelineClient(Protocol):
    """What the HTTP API needs from the pipeline, typed; failures raise CoeError."""

    async def models(self) -> dict: ...  # model_listing

    async def route(self, query: Query) -> Decision: ...

    async def chat(self, query: Query) -> Result: ...

    def chat_stream(self, query: Query) -> AsyncIterator[StreamStart | StreamPiece | Result]: ...

    async def pool_reports(self) -> list[dict]: ...  # one pool_report per backend holding experts

    async def reload(self) -> dict: ...  # re-read the catalog and router folders (Pipeline.reload)


class LocalPipelineClient:
    """A Pipeline in this process (tests, benchmarks): concurrent calls share the engine loop."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    async def models(self) -> dict:
        return model_listing(self.pipeline)

    async def route(self, query: Query) -> Decision:
        [decision] = await asyncio.get_running_loop().run_in_executor(None, self.pipeline.route, [query])
        return decision

    async def chat(self, query: Query) -> Result:
        [result] = await self.pipeline.arun([query])
        return result

    def chat_stream(self, query: Query) -> AsyncIterator[StreamStart | StreamPiece | Result]:
        return self.pipeline.astream(query)

    async def pool_reports(self) -> list[dict]:
        return [pool_report(self.pipeline.backend)]

    async def reload(self) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.pipeline.reload)


def model_listing(pipeline, backend: str | None = None) -> dict:
    """`backend`: the backend that runs the experts, where the pipeline reaches them remotely."""
    return {"policies": pipeline.policies, "default_policy": pipeline.default_policy, "experts": sorted(pipeline.available),
            "backend": backend or pipeline.backend.name}


class BodyLimit:
    """ASGI middleware: a request body past `max_bytes` is a 413, counted on the bytes received, so
    a chunked body without Content-Length cannot grow past it either. Starlette has no body limit
    of its own; raising HTTPException from `receive` is how FastAPI lets a middleware fail the
    body read (the endpoint re-raises it and the app's handler writes the OpenAI error)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(413, f"the request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


@dataclass
class ApiSettings:
    api_keys: list[str] = field(default_factory=list)  # bare keys, without limits (a KeyGate takes named ones)
    log_prompts: bool = False  # prompt text never reaches the logs unless this is on
    max_body_bytes: int = 1_000_000  # past it: 413 (Content-Length before reading, else the bytes received)


def build_api(client: PipelineClient, settings: ApiSettings | None = None, gate: KeyGate | None = None,
              cache: ResponseCache | None = None, feedback: FeedbackStore | None = None) -> FastAPI:
    """`gate`: the keys with their limits, budgets and usage (default: the settings' bare keys, no
    limits); `cache`: the response cache for deterministic requests (default: none); `feedback`:
    where answered responses wait for their score (POST /v1/feedback; default: none)."""
    settings = settings or ApiSettings()
    gate = gate or KeyGate.bare(settings.api_keys)
    if cache is not None:
        metrics.CACHE.track(cache)
    api = FastAPI(title="coe", version="0.1.0", description="OpenAI-compatible compound expert router")

    @api.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = "the request body is not valid JSON" if first["type"] == "json_invalid" else first["msg"]
        return ApiError(400, f"{where}: {message}" if where else message, param=where or None).response()

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return ApiError(exc.status_code, message).response()

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @api.exception_handler(KeyDenied)
    async def _key_denied(request: Request, exc: KeyDenied):
        key = getattr(request.state, "key", None)
        metrics.KEY_REJECTIONS.labels(key.name if key is not None else "-", exc.denial.code).inc()
        return exc.denial.response()

    @api.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error")
        return ApiError(500, f"internal error ({type(exc).__name__}); see the server log").response()

    # Inside _guard (added first): an exception from `receive` would reach the endpoint wrapped in
    # the ExceptionGroup of _guard's task group, and FastAPI would make it a 400.
    api.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @api.middleware("http")
    async def _guard(request: Request, call_next):
        """Auth and body size before anything is parsed; in-flight requests counted per endpoint."""
        path = request.url.path
        request.state.key = None
        if path.startswith("/v1/") and gate.enabled:
            try:
                request.state.key = gate.authorize(request.headers.get("authorization", ""))
            except KeyDenied as exc:
                metrics.KEY_REJECTIONS.labels("-", exc.denial.code).inc()
                return exc.denial.response()
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_body_bytes:
            return ApiError(413, f"the request body is larger than {settings.max_body_bytes} bytes").response()
        endpoint = path.rsplit("/", 1)[-1] or "root"
        metrics.IN_FLIGHT.labels(endpoint).inc()
        try:
            return await call_next(request)
        finally:
            metrics.IN_FLIGHT.labels(endpoint).dec()

    def _fail(exc: BaseException, endpoint: str) -> ApiError:
        error = as_coe_error(exc)
        metrics.REQUESTS.labels(endpoint, "-", str(error.status_code)).inc()
        if isinstance(error, OverloadedError):
            metrics.REJECTED.labels(endpoint).inc()
        return ApiError.of(error)

    def _log(event: str, status: int, seconds: float, body: ChatCompletionRequest, result: Result | None) -> None:
        """One JSON line per request; prompt text only when log_prompts is on."""
        record = {"event": event, "status": status, "model": body.model, "seconds": round(seconds, 4)}
        if result is not None:
            record.update(policy=result.decision.policy, answered_by=result.experts, fallback=result.fell_back,
                          incidents=len(result.incidents), tokens=result.usage.total_tokens)
            if result.decision.shadow is not None:
                record["shadow"] = result.decision.shadow.model_dump()
        if settings.log_prompts:
            record["prompt"] = body.messages[-1].text
        logger.info(json.dumps(record))

    @api.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    async def _pool_reports() -> list[dict]:
        return await asyncio.wait_for(client.pool_reports(), POOL_REPORT_TIMEOUT_S)

    @api.get("/metrics")
    async def get_metrics() -> Response:
        try:  # the pools' counters live with the pools: fetch them for this scrape
            metrics.POOLS.update(await _pool_reports())
        except Exception:  # a busy or restarting pool must not fail the scrape: its last figures stay
            metrics.POOL_REPORT_ERRORS.inc()
        if gate.enabled:
            metrics.USAGE.update(await gate.usage())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @api.post("/v1/feedback")
    async def give_feedback(body: FeedbackRequest) -> dict:
        """A score in [0, 1] for an earlier response, by its id: it credits the experts that
        answered it, and `coe router fit --from-feedback` refits from these scores."""
        if feedback is None:
            raise ApiError(404, "feedback is off on this server (feedback.enabled: false)", code="feedback_off")
        try:
            return await asyncio.to_thread(feedback.score, body.id, body.score)
        except Exception as exc:
            raise _fail(exc, "feedback") from None

    @api.post("/v1/admin/reload")
    async def reload(request: Request) -> dict:
        """Read the catalog and the router folders again, without a restart (an admin key, where
        keys are configured); requests in flight finish with the routing they started with."""
        key = request.state.key
        if gate.enabled and not key.admin:
            raise ApiError(403, "reloading needs an admin key", code="admin_only")
        try:
            return await client.reload()
        except Exception as exc:
            raise _fail(exc, "reload") from None

    @api.get("/v1/usage")
    async def usage(request: Request) -> dict:
        """Requests, tokens and cost per key and expert: every key's for an admin key, else the key's own."""
        if request.state.key is None:
            raise ApiError(404, "no keys are configured, so no usage is kept", code="usage_not_kept")
        return await gate.usage(request.state.key)

    @api.get("/v1/pool")
    async def pools() -> dict:
        """Where each expert resides now, bytes per tier and the pools' moves (a coe extension)."""
        return {"object": "list", "data": await _pool_reports()}

    def _model_ids(info: dict) -> list[str]:
        return ["coe"] + [f"coe-{p}" for p in info["policies"]] + info["experts"]

    def _model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "coe"}

    @api.get("/v1/models")
    async def models() -> dict:
        """Virtual models (`coe` = the default policy, `coe-<policy>`) and every concrete expert."""
        info = await client.models()
        return {"object": "list", "data": [_model_card(i) for i in _model_ids(info)], "coe": {"backend": info["backend"]}}

    @api.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        if model_id not in _model_ids(await client.models()):
            raise ApiError(404, f"unknown model {model_id!r}; GET /v1/models lists them", param="model", code="model_not_found")
        return _model_card(model_id)

    @api.post("/v1/route")
    async def route(body: ChatCompletionRequest) -> dict:
        """The routing decision with its explanation, without generating."""
        try:
            decision = await client.route(body.to_query())
        except Exception as exc:
            raise _fail(exc, "route") from None
        metrics.REQUESTS.labels("route", decision.policy, "200").inc()
        return decision.model_dump()

    def query_of(body: ChatCompletionRequest, request: Request) -> Query:
        query = body.to_query()
        if query.session is None and request.headers.get("x-coe-session"):
            query.session = request.headers["x-coe-session"][:256]
        query.trace = tracing.carrier()  # the engine's and the experts' spans nest under the ingress's
        return query

    async def admitted(body: ChatCompletionRequest, request: Request, query: Query):
        """The request's key, allowed this model and admitted by its limits (KeyDenied: 403/429)."""
        if not gate.enabled:
            return None
        key = gate.authorize(request.headers.get("authorization", ""), body.model)
        await gate.admit(key, estimate_tokens(sum(len(m.text) for m in body.messages), query.params.max_tokens))
        return key

    async def count(key, result: Result, query: Query) -> None:
        """Usage against the key; the response kept for its feedback (by its id)."""
        if feedback is not None:
            await asyncio.to_thread(feedback.record, response_id(query), query.text, result.decision.policy, result.experts)
        if key is not None:
            for answer in [*result.answers, *([result.aggregator_answer] if result.aggregator_answer else [])]:
                await gate.record(key, answer.expert, answer.prompt_tokens, answer.completion_tokens, answer.cost)

    @api.post("/v1/chat/completions")
    @tracing.traced("ingress")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        query = query_of(body, request)
        key = await admitted(body, request, query)
        if body.stream:
            return await _stream(body, query, key)
        started = time.perf_counter()
        hit = await asyncio.to_thread(cache.lookup, query) if cache is not None else None
        if hit is not None:
            result = Result.model_validate(hit.value["result"])
            metrics.REQUESTS.labels("chat", result.decision.policy, "200").inc()
            _log("chat", 200, time.perf_counter() - started, body, result)
            headers = routing_headers(result.decision, 0.0, result) | {"x-coe-cache": hit.kind}
            return JSONResponse(chat_completion(result, body.model, response_id(query), hit.annotated()["cache"]),
                                headers=headers)
        try:
            result = await client.chat(query)
        except Exception as exc:
            error = _fail(exc, "chat")
            _log("chat", error.status, time.perf_counter() - started, body, None)
            raise error from None
        seconds = time.perf_counter() - started
        observe(result, seconds, stream=False)
        _log("chat", 200, seconds, body, result)
        await count(key, result, query)
        if cache is not None:
            await asyncio.to_thread(cache.store, query, {"result": result.model_dump(mode="json")})
        headers = routing_headers(result.decision, result.timings.get("load", 0.0), result)
        return JSONResponse(chat_completion(result, body.model, response_id(query)), headers=headers)

    async def _stream(body: ChatCompletionRequest, query: Query, key) -> StreamingResponse:
        started = time.perf_counter()
        events = client.chat_stream(query).__aiter__()
        try:
            first = await events.__anext__()
        except Exception as exc:
            error = _fail(exc, "chat")
            _log("chat", error.status, time.perf_counter() - started, body, None)
            raise error from None
        cid, created = response_id(query), int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            yield chunk(cid, created, body.model, {"role": "assistant", "content": ""})
            first_text = True
            try:
                async for event in events:
                    if isinstance(event, StreamPiece):
                        if first_text:
                            metrics.FIRST_TOKEN.labels(first.decision.policy).observe(time.perf_counter() - started)
                            first_text = False
                        yield chunk(cid, created, body.model, {"content": event.text})
                    elif isinstance(event, Result):
                        seconds = time.perf_counter() - started
                        observe(event, seconds, stream=True)
                        _log("chat_stream", 200, seconds, body, event)
                        await count(key, event, query)
                        yield chunk(cid, created, body.model, {}, event.finish_reason, coe=describe(event))
                        if include_usage:
                            yield usage_chunk(cid, created, body.model, event.usage)
            except Exception as exc:  # mid-stream: the status line is gone, the error goes in the stream
                error = _fail(exc, "chat")
                _log("chat_stream", error.status, time.perf_counter() - started, body, None)
                yield f"data: {json.dumps(error_body(error.message, error.status))}\n\n"
            finally:
                await events.aclose()
            yield DONE

        headers = routing_headers(first.decision, first.load_seconds)
        headers["cache-control"] = "no-cache"
        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    add_ui(api)
    return api
