"""The OpenAI-compatible HTTP API as a plain FastAPI app over a PipelineClient (no Ray here).

On Serve, the ingress deployment builds this app over the engine in its own process, whose
backend reaches the pool deployments (deploy/app.py); in tests and benchmarks it runs in-process
over a Pipeline (LocalPipelineClient).
What comes back from the pipeline is typed (Decision, StreamStart, StreamPiece, Result, CoeError)
and rendered here once: the OpenAI body, the routing headers and the metrics.
Every error leaves in the OpenAI error format with its status code: 400 bad input, 401 no key,
404 unknown model or path, 413 body too large, 503 overload (with Retry-After) or failing experts.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from core.errors import CoeError, InternalError, OverloadedError, UnknownNameError, UnsupportedFieldError
from core.types import Decision, Query, Result, StreamPiece, StreamStart
from deploy import metrics
from deploy.cache import ResponseCache
from deploy.keys import KeyDenied, KeyGate, estimate_tokens
from deploy.openai_api import (
    DONE,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    FeedbackRequest,
    chat_completion,
    chunk,
    closing_chunks,
    completion_chunk,
    completion_closing_chunks,
    describe,
    embeddings_body,
    error_body,
    observe,
    response_id,
    routing_headers,
    text_completion,
    usage_chunk,
)
from deploy.ui import add_ui
from experts.backends.base import pool_report
from orchestrator.feedback import FeedbackStore

logger = logging.getLogger("coe.serve")
POOL_REPORT_TIMEOUT_S = 5.0
EMBEDDING_MODEL = "all-MiniLM-L6-v2"  # the routing embedder (routers/embedder.py), served at /v1/embeddings
EMBEDDING_MODELS = (EMBEDDING_MODEL, EMBEDDING_MODEL.lower())
EMBEDDING_DIMENSIONS = 384


class ApiError(Exception):
    """An error for the client, in the OpenAI format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    @classmethod
    def of(cls, exc: CoeError) -> ApiError:
        unknown_model = isinstance(exc, UnknownNameError)
        unsupported = isinstance(exc, UnsupportedFieldError)
        code = "model_not_found" if unknown_model else "unsupported_parameter" if unsupported else \
            "overloaded" if isinstance(exc, OverloadedError) else None
        return cls(exc.status_code, str(exc), param="model" if unknown_model else getattr(exc, "param", None), code=code,
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

    async def embed(self, texts: list[str]) -> list[list[float]]: ...  # the routing embedder's vectors


class LocalPipelineClient:
    """A Pipeline in this process (tests, benchmarks): concurrent calls share the engine loop."""

    def __init__(self, pipeline, backend_name: str | None = None):
        """`backend_name`: what runs the experts where the pipeline reaches them in other processes."""
        self.pipeline = pipeline
        self.backend_name = backend_name

    async def models(self) -> dict:
        return model_listing(self.pipeline, self.backend_name)

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

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(embed_texts, texts)


class Admission:
    """The bounds of `serve.admission` on one replica's engine: up to `max_running` requests at
    once, `max_waiting` more waiting for a slot, the rest an OverloadedError (503 with Retry-After).
    A bound of coe's own, not Serve's queue on the ingress: Serve's proxy would answer that with
    its own 503, without Retry-After or the OpenAI error body."""

    def __init__(self, max_running: int, max_waiting: int, retry_after: int):
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_running)

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._slots.locked() and self.waiting >= self.max_waiting:
            raise OverloadedError(retry_after=self.retry_after)
        self.waiting += 1
        try:
            await self._slots.acquire()  # at once while a slot is free
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


def embed_texts(texts: list[str]):
    """The routing embedder's unit vectors (routers/embedder.py), one row per text."""
    from routers.embedder import shared_embedder

    return shared_embedder().embed(texts)


def _is_type_tag(part) -> bool:
    """pydantic's name of a union member in an error location (`str`, `list[TextPart]`, `function-after[...]`)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none") or "[" in part
                                      or "-" in part or part[:1].isupper())


def model_listing(pipeline, backend: str | None = None) -> dict:
    """`backend`: the backend that runs the experts, where the pipeline reaches them remotely."""
    return {"policies": pipeline.policies, "default_policy": pipeline.default_policy, "experts": sorted(pipeline.available),
            "backend": backend or pipeline.backend.name,
            "capabilities": {e: pipeline.capabilities(e).model_dump() for e in sorted(pipeline.available)}}


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
        # A union's alternatives add their type names to the location: leave them out.
        where = ".".join(str(p) for p in first["loc"] if p != "body" and not _is_type_tag(p))
        if first["type"] == "json_invalid":
            message = "the request body is not valid JSON"
        elif first["type"] == "extra_forbidden":
            return ApiError(400, f"unrecognized request argument supplied: {where} (the fields coe implements: "
                                 "README, The OpenAI API)", param=where, code="unknown_parameter").response()
        else:
            message = first["msg"].removeprefix("Value error, ")
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

    def _log(event: str, status: int, seconds: float, model: str, prompt: str, result: Result | None) -> None:
        """One JSON line per request; prompt text only when log_prompts is on."""
        record = {"event": event, "status": status, "model": model, "seconds": round(seconds, 4)}
        if result is not None:
            record.update(policy=result.decision.policy, answered_by=result.experts, fallback=result.fell_back,
                          incidents=len(result.incidents), tokens=result.usage.total_tokens)
            if result.decision.shadow is not None:
                record["shadow"] = result.decision.shadow.model_dump()
        if settings.log_prompts:
            record["prompt"] = prompt
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
        return ["coe"] + [f"coe-{p}" for p in info["policies"]] + info["experts"] + [EMBEDDING_MODEL]

    def _model_card(model_id: str, info: dict) -> dict:
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "coe"}
        if model_id in info.get("capabilities", {}):  # an expert: what it can do beyond plain text
            card["coe"] = {"capabilities": info["capabilities"][model_id]}
        return card

    @api.get("/v1/models")
    async def models() -> dict:
        """Virtual models (`coe` = the default policy, `coe-<policy>`) and every concrete expert."""
        info = await client.models()
        return {"object": "list", "data": [_model_card(i, info) for i in _model_ids(info)], "coe": {"backend": info["backend"]}}

    @api.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        info = await client.models()
        if model_id not in _model_ids(info):
            raise ApiError(404, f"unknown model {model_id!r}; GET /v1/models lists them", param="model", code="model_not_found")
        return _model_card(model_id, info)

    @api.post("/v1/route")
    async def route(body: ChatCompletionRequest) -> dict:
        """The routing decision with its explanation, without generating."""
        try:
            decision = await client.route(body.to_query())
        except Exception as exc:
            raise _fail(exc, "route") from None
        metrics.REQUESTS.labels("route", decision.policy, "200").inc()
        return decision.model_dump()

    def with_session(query: Query, request: Request) -> Query:
        if query.session is None and request.headers.get("x-coe-session"):
            query.session = request.headers["x-coe-session"][:256]
        query.trace = tracing.carrier()  # the engine's and the experts' spans nest under the ingress's
        return query

    async def admitted(model: str, prompt_chars: int, max_tokens: int, request: Request):
        """The request's key, allowed this model and admitted by its limits (KeyDenied: 403/429)."""
        if not gate.enabled:
            return None
        key = gate.authorize(request.headers.get("authorization", ""), model)
        await gate.admit(key, estimate_tokens(prompt_chars, max_tokens))
        return key

    async def count(key, result: Result, query: Query, response: str) -> None:
        """Usage against the key; the response kept for its feedback (by its id, `response`)."""
        if feedback is not None:
            await asyncio.to_thread(feedback.record, response, query.text, result.decision.policy, result.experts)
        if key is not None:
            for answer in [*result.answers, *([result.aggregator_answer] if result.aggregator_answer else [])]:
                await gate.record(key, answer.expert, answer.prompt_tokens, answer.completion_tokens, answer.cost)

    @api.post("/v1/chat/completions")
    @tracing.traced("ingress")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        query = with_session(body.to_query(), request)
        key = await admitted(body.model, sum(len(m.text) for m in body.messages), query.params.max_tokens * body.n, request)
        prompt = body.messages[-1].text
        if body.stream:
            return await _stream(body, query, key, prompt, "chat")
        started = time.perf_counter()
        hit = await asyncio.to_thread(cache.lookup, query) if cache is not None else None
        if hit is not None:
            result = Result.model_validate(hit.value["result"])
            metrics.REQUESTS.labels("chat", result.decision.policy, "200").inc()
            _log("chat", 200, time.perf_counter() - started, body.model, prompt, result)
            headers = routing_headers(result.decision, 0.0, result) | {"x-coe-cache": hit.kind}
            return JSONResponse(chat_completion(result, body.model, response_id(query), hit.annotated()["cache"]),
                                headers=headers)
        [result] = await _answer([query], body.model, prompt, "chat", started)
        await count(key, result, query, response_id(query))
        if cache is not None:
            await asyncio.to_thread(cache.store, query, {"result": result.model_dump(mode="json")})
        headers = routing_headers(result.decision, result.timings.get("load", 0.0), result)
        return JSONResponse(chat_completion(result, body.model, response_id(query)), headers=headers)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """The prompt as it is (no chat template), routed like a chat request; text and logprobs
        out in the completions API's shape, as vLLM's server answers it."""
        queries = [with_session(q, request) for q in body.to_queries()]
        key = await admitted(body.model, sum(map(len, body.prompts)), body.max_tokens * body.n * len(queries), request)
        if body.stream:
            return await _stream(body, queries[0], key, body.prompts[0], "completions")
        results = await _answer(queries, body.model, body.prompts[-1], "completions", time.perf_counter())
        response = response_id(queries[0], "cmpl")
        for query, result in zip(queries, results):
            await count(key, result, query, response)
        headers = routing_headers(results[0].decision, results[0].timings.get("load", 0.0), results[0])
        return JSONResponse(text_completion(results, body.model, response), headers=headers)

    @api.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        """The routing embedder's vectors (all-MiniLM-L6-v2, unit length), in OpenAI's shape."""
        if body.model not in EMBEDDING_MODELS:
            raise ApiError(404, f"unknown embedding model {body.model!r}; coe embeds with {EMBEDDING_MODEL}",
                           param="model", code="model_not_found")
        if body.dimensions is not None and body.dimensions != EMBEDDING_DIMENSIONS:
            raise ApiError(400, f"dimensions: {EMBEDDING_MODEL} has {EMBEDDING_DIMENSIONS} dimensions, "
                                "and coe does not shorten them", param="dimensions", code="unsupported_value")
        prompt_tokens = sum(estimate_tokens(len(t), 0) for t in body.texts)
        if gate.enabled:
            key = gate.authorize(request.headers.get("authorization", ""))
            await gate.admit(key, prompt_tokens)
        try:
            vectors = await client.embed(body.texts)
        except Exception as exc:
            raise _fail(exc, "embeddings") from None
        metrics.REQUESTS.labels("embeddings", "-", "200").inc()
        return embeddings_body(vectors, body.model, body.encoding_format, prompt_tokens)

    async def _answer(queries: list[Query], model: str, prompt: str, endpoint: str, started: float) -> list[Result]:
        try:
            results = await asyncio.gather(*(client.chat(q) for q in queries))
        except Exception as exc:
            error = _fail(exc, endpoint)
            _log(endpoint, error.status, time.perf_counter() - started, model, prompt, None)
            raise error from None
        seconds = time.perf_counter() - started
        for result in results:
            observe(result, seconds, stream=False, endpoint=endpoint)
            _log(endpoint, 200, seconds, model, prompt, result)
        return list(results)

    async def _stream(body: ChatCompletionRequest | CompletionRequest, query: Query, key, prompt: str,
                      endpoint: str) -> StreamingResponse:
        started = time.perf_counter()
        events = client.chat_stream(query).__aiter__()
        try:
            first = await events.__anext__()
        except Exception as exc:
            error = _fail(exc, endpoint)
            _log(endpoint, error.status, time.perf_counter() - started, body.model, prompt, None)
            raise error from None
        cid, created = response_id(query, "chatcmpl" if endpoint == "chat" else "cmpl"), int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chat = endpoint == "chat"

        async def sse() -> AsyncIterator[str]:
            if chat:
                yield chunk(cid, created, body.model, {"role": "assistant", "content": ""})
            first_text = True
            try:
                async for event in events:
                    if isinstance(event, StreamPiece):
                        if first_text:
                            metrics.FIRST_TOKEN.labels(first.decision.policy).observe(time.perf_counter() - started)
                            first_text = False
                        yield (chunk(cid, created, body.model, {"content": event.text}) if chat
                               else completion_chunk(cid, created, body.model, event.text))
                    elif isinstance(event, Result):
                        seconds = time.perf_counter() - started
                        observe(event, seconds, stream=True, endpoint=endpoint)
                        _log(f"{endpoint}_stream", 200, seconds, body.model, prompt, event)
                        await count(key, event, query, cid)
                        closing = closing_chunks if chat else completion_closing_chunks
                        for last in closing(cid, created, body.model, event):
                            yield last
                        if include_usage:
                            yield usage_chunk(cid, created, body.model, event.usage,
                                              "chat.completion.chunk" if chat else "text_completion")
            except Exception as exc:  # mid-stream: the status line is gone, the error goes in the stream
                error = _fail(exc, endpoint)
                _log(f"{endpoint}_stream", error.status, time.perf_counter() - started, body.model, prompt, None)
                yield f"data: {json.dumps(error_body(error.message, error.status, error.param, error.code))}\n\n"
            finally:
                await events.aclose()
            yield DONE

        headers = routing_headers(first.decision, first.load_seconds)
        headers["cache-control"] = "no-cache"
        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    add_ui(api)
    return api
