"""The OpenAI-compatible HTTP API as a plain FastAPI app over a PipelineClient (no Ray here).

On Serve, the ingress deployment builds this app over handles to the router deployment
(deploy/app.py); in tests and benchmarks it can run in-process over a Pipeline (LocalPipelineClient).
Every error leaves in the OpenAI error format with its status code: 400 bad input, 401 no key,
404 unknown model or path, 413 body too large, 503 overload (with Retry-After) or failing experts.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import CoeError
from core.types import Query
from deploy import metrics
from deploy.openai_api import DONE, ChatCompletionRequest, chat_completion, chunk, completion_id, error_body, usage_chunk
from experts.backends.base import iterate_in_thread, pool_report

logger = logging.getLogger("coe.serve")
POOL_REPORT_TIMEOUT_S = 5.0


class ApiError(Exception):
    """An error for the client, in the OpenAI format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    @classmethod
    def from_reply(cls, reply: dict) -> ApiError:
        status = reply["status"]
        return cls(status, reply["error"], param="model" if status == 404 else None,
                   code="model_not_found" if status == 404 else None)

    def response(self) -> JSONResponse:
        headers = {"retry-after": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(error_body(self.message, self.status, self.param, self.code), self.status, headers=headers)


def error_reply(exc: Exception) -> dict:
    """How an error travels from the router to the ingress: a plain dict, never a pickled exception."""
    if isinstance(exc, CoeError):
        return {"error": str(exc), "status": exc.status_code}
    logger.exception("internal error")
    return {"error": f"internal error ({type(exc).__name__}); see the server log", "status": 500}


class PipelineClient(Protocol):
    """What the HTTP API needs from the pipeline; replies are plain dicts (see error_reply)."""

    async def models(self) -> dict: ...

    async def route(self, query: Query) -> dict: ...  # {"decision": ...} or an error reply

    async def chat(self, query: Query) -> dict: ...  # {"details": Pipeline.describe(...)} or an error reply

    def chat_stream(self, query: Query) -> AsyncIterator[dict]: ...  # stream events (stream_events)

    async def pool_reports(self) -> list[dict]: ...  # one pool_report per backend holding experts


def stream_events(events: Iterator) -> Iterator[dict]:
    """Pipeline.stream's typed events as plain dicts: start, text, incident, result or error."""
    from core.types import Incident, Result, StreamPiece, StreamStart
    from orchestrator.pipeline import Pipeline

    try:
        for event in events:
            if isinstance(event, StreamStart):
                yield {"start": {"decision": event.decision.model_dump(), "load_seconds": event.load_seconds}}
            elif isinstance(event, StreamPiece):
                yield {"text": event.text}
            elif isinstance(event, Incident):
                yield {"incident": event.model_dump()}
            elif isinstance(event, Result):
                yield {"result": Pipeline.describe(event)}
    except Exception as exc:
        yield error_reply(exc)


class LocalPipelineClient:
    """A Pipeline in this process (tests, benchmarks); one query per call, no batching across calls."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def models(self) -> dict:
        return model_listing(self.pipeline)

    async def route(self, query: Query) -> dict:
        try:
            [decision] = await self._in_thread(self.pipeline.route, [query])
        except Exception as exc:
            return error_reply(exc)
        return {"decision": decision.model_dump()}

    async def chat(self, query: Query) -> dict:
        try:
            [result] = await self._in_thread(self.pipeline.run, [query])
        except Exception as exc:
            return error_reply(exc)
        return {"details": self.pipeline.describe(result)}

    def chat_stream(self, query: Query) -> AsyncIterator[dict]:
        return pipeline_stream(self.pipeline, query)

    async def pool_reports(self) -> list[dict]:
        return [pool_report(self.pipeline.backend)]


async def pipeline_stream(pipeline, query: Query) -> AsyncIterator[dict]:
    """A Pipeline's stream as plain dict events, its blocking steps on worker threads; an unknown
    model is the first (and only) event, before anything runs."""
    try:
        pipeline.resolve_policy(query.policy)
    except CoeError as exc:
        yield error_reply(exc)
        return
    async for event in iterate_in_thread(stream_events(pipeline.stream(query))):
        yield event


async def _guarded(events: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """A stream's events; a failure of the transport itself becomes a last error event."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        yield error_reply(exc)


def model_listing(pipeline, backend: str | None = None) -> dict:
    """`backend`: the backend that runs the experts, where the pipeline reaches them remotely."""
    return {"policies": pipeline.policies, "default_policy": pipeline.default_policy, "experts": sorted(pipeline.available),
            "backend": backend or pipeline.backend.name}


def authorized(authorization_header: str, api_keys: list[bytes]) -> bool:
    """True with no keys configured, or with `Bearer <key>` for a configured key."""
    if not api_keys:
        return True
    scheme, _, token = authorization_header.partition(" ")
    # compare_digest against every key: the time taken does not tell how much of a key matched
    matches = [hmac.compare_digest(token.encode(), key) for key in api_keys]
    return scheme.lower() == "bearer" and any(matches)


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
    api_keys: list[str] = field(default_factory=list)
    log_prompts: bool = False  # prompt text never reaches the logs unless this is on
    max_body_bytes: int = 1_000_000  # past it: 413 (Content-Length before reading, else the bytes received)


def routing_headers(decision: dict, load_seconds: float, details: dict | None = None) -> dict:
    """Routing metadata as response headers: policy, chosen experts with scores, aggregator, load time."""
    chosen = decision["ranked"][: decision["k"]]
    headers = {
        "x-coe-policy": decision["policy"],
        "x-coe-experts": ",".join(s["expert"] for s in chosen),
        "x-coe-scores": ",".join(f"{s['expert']}={s['score']:.4f}" for s in decision["ranked"]),
        "x-coe-aggregator": decision["aggregator"],
        "x-coe-load-seconds": f"{load_seconds:.4f}",
    }
    if details is not None:
        headers["x-coe-answered-by"] = ",".join(details["answered_by"])
        headers["x-coe-fallback"] = str(details["fallback"]).lower()
    return headers


def _decision_of(details: dict) -> dict:
    ranked = [{"expert": e["name"], "score": e["score"]} for e in details["experts"]]
    return {"policy": details["policy"], "ranked": ranked, "k": sum(e["chosen"] for e in details["experts"]),
            "aggregator": details["aggregator"]}


def build_api(client: PipelineClient, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    keys = [k.encode() for k in settings.api_keys]
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
        if path.startswith("/v1/") and not authorized(request.headers.get("authorization", ""), keys):
            return ApiError(401, "invalid or missing API key; send Authorization: Bearer <key>", code="invalid_api_key").response()
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_body_bytes:
            return ApiError(413, f"the request body is larger than {settings.max_body_bytes} bytes").response()
        endpoint = path.rsplit("/", 1)[-1] or "root"
        metrics.IN_FLIGHT.labels(endpoint).inc()
        try:
            return await call_next(request)
        finally:
            metrics.IN_FLIGHT.labels(endpoint).dec()

    def _fail(reply: dict, endpoint: str) -> None:
        metrics.REQUESTS.labels(endpoint, "-", str(reply["status"])).inc()
        if reply["status"] == 503 and reply.get("overloaded"):
            metrics.REJECTED.labels(endpoint).inc()
            raise ApiError(503, reply["error"], code="overloaded", retry_after=reply.get("retry_after"))
        raise ApiError.from_reply(reply)

    def _log(event: str, status: int, seconds: float, body: ChatCompletionRequest, details: dict | None) -> None:
        """One JSON line per request; prompt text only when log_prompts is on."""
        record = {"event": event, "status": status, "model": body.model, "seconds": round(seconds, 4)}
        if details is not None:
            record.update(policy=details["policy"], answered_by=details["answered_by"], fallback=details["fallback"],
                          incidents=len(details["incidents"]), tokens=details["usage"]["total_tokens"])
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
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

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
        reply = await client.route(body.to_query())
        if "error" in reply:
            _fail(reply, "route")
        metrics.REQUESTS.labels("route", reply["decision"]["policy"], "200").inc()
        return reply["decision"]

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        if body.stream:
            return await _stream(body)
        started = time.perf_counter()
        reply = await client.chat(body.to_query())
        if "error" in reply:
            _log("chat", reply["status"], time.perf_counter() - started, body, None)
            _fail(reply, "chat")
        details = reply["details"]
        seconds = time.perf_counter() - started
        metrics.observe_result(details, seconds, stream=False)
        _log("chat", 200, seconds, body, details)
        headers = routing_headers(_decision_of(details), details["timings"].get("load", 0.0), details)
        return JSONResponse(chat_completion(details, body.model), headers=headers)

    async def _stream(body: ChatCompletionRequest) -> StreamingResponse:
        started = time.perf_counter()
        events = client.chat_stream(body.to_query()).__aiter__()
        first = await events.__anext__()
        if "error" in first:
            _log("chat", first["status"], time.perf_counter() - started, body, None)
            _fail(first, "chat")
        cid, created = completion_id(), int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            yield chunk(cid, created, body.model, {"role": "assistant", "content": ""})
            first_text = True
            async for event in _guarded(events):
                if "text" in event:
                    if first_text:
                        metrics.FIRST_TOKEN.labels(first["start"]["decision"]["policy"]).observe(time.perf_counter() - started)
                        first_text = False
                    yield chunk(cid, created, body.model, {"content": event["text"]})
                elif "result" in event:
                    details = event["result"]
                    seconds = time.perf_counter() - started
                    metrics.observe_result(details, seconds, stream=True)
                    _log("chat_stream", 200, seconds, body, details)
                    yield chunk(cid, created, body.model, {}, details["finish_reason"], coe=details)
                    if include_usage:
                        yield usage_chunk(cid, created, body.model, details["usage"])
                elif "error" in event:  # mid-stream: the status line is gone, the error goes in the stream
                    metrics.REQUESTS.labels("chat", "-", str(event["status"])).inc()
                    _log("chat_stream", event["status"], time.perf_counter() - started, body, None)
                    yield f"data: {json.dumps(error_body(event['error'], event['status']))}\n\n"
                    break
            yield DONE

        headers = routing_headers(first["start"]["decision"], first["start"]["load_seconds"])
        headers["cache-control"] = "no-cache"
        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    return api
