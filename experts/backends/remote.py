"""Remote backend: experts served by another OpenAI-compatible server (a vLLM server on the
user's GPUs, a second coe, a hosted API), called with the `openai` async client.

One client per endpoint (base URL and key variable) and event loop keeps its connections open
across requests; `max_concurrency` bounds the requests in flight to an expert's endpoint (more
wait their turn). A streamed request forwards the upstream's text as it arrives; every answer's
token counts are the upstream's usage.

Errors, as the engine counts them:
- the expert failed (plain exceptions: retry, fallback, cooldown): upstream 429 and 5xx, a key
  or model the upstream does not accept (401, 403, 404: the catalog is wrong, not the request),
  connection errors, a stream cut before its end (RemoteExpertError), no answer or no next piece
  within `timeout_seconds` (RemoteTimeoutError, a TimeoutError);
- the request's fault (RemoteRequestError, a CoeError with the upstream's status, never retried):
  every other 4xx, e.g. a prompt longer than the upstream's context (400).
The API key is read from the environment variable the catalog names, when a client is built; it
is sent to the upstream and nowhere else: upstream messages are scrubbed of it, and errors and
logs name the variable, never its value.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator

from core.catalog import Catalog, ExpertSpec, RemoteWeights, safe_url
from core.config import PoolConfig
from core.errors import CoeError, WeightsMissingError
from core.types import (
    Capabilities,
    Choice,
    ExpertAnswer,
    FunctionCall,
    GenerationRequest,
    StreamPiece,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from experts.backends.base import iterate_on_loop
from experts.capabilities import expert_capabilities

logger = logging.getLogger("coe.remote")

# Upstream 4xx answers that say the expert is misconfigured rather than the request malformed.
EXPERT_FAULT_STATUSES = {401, 403, 404, 408, 429}
NO_KEY = "unused"  # what the client sends to a server that needs no key (the openai client wants one)
MESSAGE_CHARS = 300  # of an upstream's error message, in ours


class RemoteExpertError(RuntimeError):
    """The remote expert failed (unreachable, overloaded, broken, misconfigured): the engine retries,
    falls back and cools it down."""


class RemoteTimeoutError(TimeoutError):
    """The remote expert sent nothing within its timeout_seconds."""


class RemoteRequestError(CoeError):
    """The upstream refused the request itself (a 4xx such as 400): the client's error, with its status."""

    def __init__(self, problem: str, status_code: int, fix: str | None = None):
        super().__init__(problem, fix)
        self.status_code = status_code


class RemoteBackend:
    """Runs the catalog's remote experts (weights.source: remote); see the module docstring."""

    name = "remote"
    pool = None  # nothing to hold in memory

    def __init__(self, catalog: Catalog, pool: PoolConfig | dict | None = None):
        """`pool` is accepted (build_backend hands every backend the pool config) and unused."""
        for spec in catalog.experts:
            if not spec.is_remote:
                raise CoeError(f"the remote backend cannot run expert {spec.name!r}: its weights are {spec.weights.source}",
                               "give it only experts with weights.source: remote")
        self.catalog = catalog
        # Per event loop (an httpx connection pool and an asyncio semaphore belong to one loop):
        # clients by (base_url, api_key_env), semaphores by expert.
        self._clients: dict[asyncio.AbstractEventLoop, dict] = {}
        self._semaphores: dict[asyncio.AbstractEventLoop, dict] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # for the synchronous API, started on first use
        self._loop_lock = threading.Lock()

    # -- residency -------------------------------------------------------------------------

    def load(self, expert: str) -> float:
        self._weights(expert)
        return 0.0

    def resident(self) -> dict[str, str]:
        return {spec.name: "remote" for spec in self.catalog.experts}

    def capabilities(self, expert: str) -> Capabilities:
        """The catalog's flags: the endpoint does the work, coe passes the fields through."""
        return expert_capabilities(self.catalog, self.catalog.get(expert), self.name)

    # -- clients ---------------------------------------------------------------------------

    def _weights(self, expert: str) -> RemoteWeights:
        return self.catalog.get(expert).weights  # type: ignore[return-value]

    @staticmethod
    def _key(weights: RemoteWeights, expert: str) -> str | None:
        if weights.api_key_env is None:
            return None
        key = os.environ.get(weights.api_key_env)
        if not key:
            raise WeightsMissingError(f"remote expert {expert!r}: its API key variable {weights.api_key_env} is not set",
                                      f"export {weights.api_key_env}=... before starting coe")
        return key

    @staticmethod
    def _of_this_loop(store: dict) -> dict:
        """The running loop's entry of a per-loop store; entries of closed loops are dropped."""
        loop = asyncio.get_running_loop()
        if loop not in store:
            for closed in [other for other in store if other.is_closed()]:
                del store[closed]
            store[loop] = {}
        return store[loop]

    def _client(self, spec: ExpertSpec):
        from openai import AsyncOpenAI

        weights: RemoteWeights = spec.weights  # type: ignore[assignment]
        clients = self._of_this_loop(self._clients)
        endpoint = (weights.base_url, weights.api_key_env)
        if endpoint not in clients:
            # No client retries: retrying, falling back and cooling down are the engine's.
            clients[endpoint] = AsyncOpenAI(base_url=weights.base_url, api_key=self._key(weights, spec.name) or NO_KEY,
                                            max_retries=0, timeout=weights.timeout_seconds)
        return clients[endpoint]

    def _semaphore(self, spec: ExpertSpec) -> asyncio.Semaphore:
        semaphores = self._of_this_loop(self._semaphores)
        if spec.name not in semaphores:
            semaphores[spec.name] = asyncio.Semaphore(spec.weights.max_concurrency)
        return semaphores[spec.name]

    # -- generation ------------------------------------------------------------------------

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        """Text as the upstream sends it when `request.stream` (else the whole text in one piece),
        then the complete answer with the upstream's token counts, tool calls, logprobs and
        choices. Closing the iterator closes the upstream response (the server stops generating).
        A raw prompt goes to the upstream's /completions, everything else to /chat/completions."""
        spec = self.catalog.get(request.expert)
        weights: RemoteWeights = spec.weights  # type: ignore[assignment]
        body = request_body(weights.model, request)
        key = None
        try:
            key = self._key(weights, spec.name)
            client = self._client(spec)
            async with self._semaphore(spec):
                if request.params.raw_prompt:
                    completion = await client.completions.create(**body)
                elif request.stream and request.params.n == 1:
                    async for piece in self._streamed(spec, client, body):
                        yield piece
                    return
                else:
                    completion = await client.chat.completions.create(**body)
        except (CoeError, RemoteExpertError, RemoteTimeoutError):
            raise
        except Exception as exc:  # openai and httpx errors, in the engine's terms
            raise _failure(spec, exc, key) from None
        if not completion.choices:
            raise RemoteExpertError(f"remote expert {spec.name!r} ({safe_url(weights.base_url)}) answered without a choice")
        first, *more = [_choice(c) for c in sorted(completion.choices, key=lambda c: c.index)]
        if first.text:
            yield StreamPiece(text=first.text)
        usage = completion.usage
        yield StreamPiece(answer=ExpertAnswer(
            expert=spec.name, text=first.text, prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0, finish_reason=first.finish_reason,
            tool_calls=first.tool_calls, logprobs=first.logprobs, more_choices=more))

    async def _streamed(self, spec: ExpertSpec, client, body: dict) -> AsyncIterator[StreamPiece]:
        stream = await client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
        text: list[str] = []
        calls: dict[int, dict] = {}  # tool calls as their deltas arrive, by index
        logprobs: list[TokenLogprob] = []
        finish = usage = None
        pieces = 0
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices[:1]:
                    delta = (choice.delta.content or "") if choice.delta else ""
                    if not text:
                        delta = delta.lstrip()  # answers are stripped, as every backend's
                    if delta:
                        text.append(delta)
                        pieces += 1
                        yield StreamPiece(text=delta)
                    for call in (choice.delta.tool_calls or []) if choice.delta else []:
                        so_far = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                        so_far["id"] = call.id or so_far["id"]
                        if call.function is not None:
                            so_far["name"] += call.function.name or ""
                            so_far["arguments"] += call.function.arguments or ""
                    if choice.logprobs is not None and choice.logprobs.content:
                        logprobs += [TokenLogprob.model_validate(t.model_dump()) for t in choice.logprobs.content]
                    finish = choice.finish_reason or finish
        finally:
            await stream.close()
        if finish is None:
            raise RemoteExpertError(f"remote expert {spec.name!r} ({safe_url(spec.weights.base_url)}): "
                                    "the stream ended before the answer did")
        whole = "".join(text).rstrip()
        tool_calls = [ToolCall(**({"id": c["id"]} if c["id"] else {}), function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                      for _, c in sorted(calls.items())] or None
        yield StreamPiece(answer=ExpertAnswer(
            # Without upstream usage (a server that ignores include_usage), one token per piece.
            expert=spec.name, text=whole, prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else pieces, finish_reason=_finish(finish),
            tool_calls=tool_calls, logprobs=logprobs if "logprobs" in body else None))

    async def agenerate(self, request: GenerationRequest) -> ExpertAnswer:
        async for piece in self.astream(request):
            if piece.answer is not None:
                return piece.answer
        raise RemoteExpertError(f"remote expert {request.expert!r} finished without an answer")

    async def ping(self, expert: str) -> str:
        """A cheap call (list the endpoint's models) that proves the endpoint answers, takes the key
        and serves the expert's model; returns what it found, raises the failure otherwise."""
        spec = self.catalog.get(expert)
        weights: RemoteWeights = spec.weights  # type: ignore[assignment]
        key = None
        try:
            key = self._key(weights, spec.name)
            models = [m.id async for m in self._client(spec).models.list(timeout=min(weights.timeout_seconds, 10.0))]
        except CoeError:
            raise
        except Exception as exc:
            raise _failure(spec, exc, key) from None
        if weights.model not in models:
            raise RemoteExpertError(f"remote expert {expert!r}: {safe_url(weights.base_url)} does not serve model "
                                    f"{weights.model!r} (it serves: {', '.join(models[:10]) or 'nothing'})")
        return f"{safe_url(weights.base_url)} serves {weights.model}"

    # -- synchronous API (scripts, `coe experts check`) ------------------------------------

    def _on_loop(self, coroutine):
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="coe-remote-loop", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        """Every request at once (each expert's max_concurrency applies); answers in request order.
        A failed request raises after the others have finished."""
        async def every():
            return await asyncio.gather(*(self.agenerate(r) for r in requests), return_exceptions=True)

        results = self._on_loop(every()).result()
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return list(results)

    def stream(self, request: GenerationRequest) -> Iterator[StreamPiece]:
        return iterate_on_loop(self.astream(request), self._loop)

    def check(self, experts: list[str]) -> dict[str, str | Exception]:
        """`ping` every expert at once, for synchronous callers: what each endpoint said, or its failure."""
        async def every():
            return await asyncio.gather(*(self.ping(e) for e in experts), return_exceptions=True)

        return dict(zip(experts, self._on_loop(every()).result()))

    # -- shutdown --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the clients of the running event loop."""
        for client in self._clients.pop(asyncio.get_running_loop(), {}).values():
            await client.close()

    def close(self) -> None:
        """Close every client: this backend's own loop's here, other loops' on their loop (if it runs)."""
        for loop, clients in list(self._clients.items()):
            if loop is self._loop or loop.is_closed() or not loop.is_running():
                continue
            for client in clients.values():
                asyncio.run_coroutine_threadsafe(client.close(), loop)
            self._clients.pop(loop, None)
        if self._loop is not None:
            own = self._loop
            asyncio.run_coroutine_threadsafe(self.aclose(), own).result(timeout=10)
            own.call_soon_threadsafe(own.stop)
            self._loop = None


def request_body(model: str, request: GenerationRequest) -> dict:
    """The upstream request: the sampling parameters and every capability field the request
    uses (tools, tool_choice, response_format, n, logprobs), passed through as OpenAI names them."""
    p = request.params
    body: dict = {"model": model, "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p}
    if p.raw_prompt:
        body["prompt"] = request.messages[-1].content
        if p.logprobs:
            body["logprobs"] = p.top_logprobs  # the completions API's logprobs is the count of alternatives
    else:
        body["messages"] = [m.wire() for m in request.messages]
        if p.logprobs:
            body["logprobs"] = True
            if p.top_logprobs:
                body["top_logprobs"] = p.top_logprobs
        if p.tools:
            body["tools"] = [t.model_dump(exclude_none=True) for t in p.tools]
        if p.tool_choice is not None:
            body["tool_choice"] = p.tool_choice if isinstance(p.tool_choice, str) else p.tool_choice.model_dump()
        if p.response_format is not None:
            body["response_format"] = p.response_format.model_dump(exclude_none=True, by_alias=True)
    if p.n > 1:
        body["n"] = p.n
    if p.stop:
        body["stop"] = p.stop
    if p.seed is not None:
        body["seed"] = p.seed
    return body


def _finish(reason: str | None) -> str:
    return reason if reason in ("length", "tool_calls") else "stop"


def _choice(choice) -> Choice:
    """One upstream choice (a chat message, or a completion's text) in coe's terms."""
    message = getattr(choice, "message", None)
    if message is None:  # /completions: text, and logprobs in the legacy lists
        logprobs = None
        if choice.logprobs is not None and choice.logprobs.tokens is not None:
            lp = choice.logprobs
            logprobs = [TokenLogprob(token=token, logprob=logprob if logprob is not None else 0.0,
                                     top_logprobs=[TopLogprob(token=t, logprob=v) for t, v in (top or {}).items()])
                        for token, logprob, top in zip(lp.tokens, lp.token_logprobs or [], lp.top_logprobs or [None] * len(lp.tokens))]
        return Choice(text=(choice.text or "").strip(), finish_reason=_finish(choice.finish_reason), logprobs=logprobs)
    calls = [ToolCall(id=c.id, function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
             for c in message.tool_calls or [] if getattr(c, "function", None) is not None] or None
    logprobs = None
    if choice.logprobs is not None and choice.logprobs.content is not None:
        logprobs = [TokenLogprob.model_validate(t.model_dump()) for t in choice.logprobs.content]
    return Choice(text=(message.content or "").strip(), finish_reason=_finish(choice.finish_reason), tool_calls=calls,
                  logprobs=logprobs)


def _failure(spec: ExpertSpec, exc: Exception, key: str | None) -> Exception:
    """An openai or httpx error as the engine counts it (module docstring), in a message that names
    the expert and its endpoint and never the key."""
    import httpx
    import openai

    weights: RemoteWeights = spec.weights  # type: ignore[assignment]
    where = f"remote expert {spec.name!r} ({safe_url(weights.base_url)})"
    if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException)):
        return RemoteTimeoutError(f"{where}: nothing within {weights.timeout_seconds:g} s")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = _scrub(re.sub(r"^Error code: \d+ - ", "", str(getattr(exc, "message", "") or "")), key)
        if status in (401, 403):
            detail = f"the endpoint refused the key in {weights.api_key_env}" if weights.api_key_env else \
                "the endpoint wants a key: name its variable in api_key_env"
        message = f"{where}: HTTP {status}: {detail}"
        if 400 <= status < 500 and status not in EXPERT_FAULT_STATUSES:
            return RemoteRequestError(message, status)
        return RemoteExpertError(message)
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
        cause = exc.__cause__ or exc.__context__
        reason = type(cause).__name__ if cause is not None and not isinstance(exc, httpx.TransportError) else type(exc).__name__
        return RemoteExpertError(f"{where}: connection failed ({reason})")
    return RemoteExpertError(f"{where}: {type(exc).__name__}: {_scrub(str(exc), key)}")


def _scrub(text: str, key: str | None) -> str:
    """One line of an upstream's message, without the key (should the upstream echo it)."""
    if key:
        text = text.replace(key, "***")
    return " ".join(text.split())[:MESSAGE_CHARS]
