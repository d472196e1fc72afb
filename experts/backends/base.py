"""What every backend offers the engine: `astream` one request (the only way the engine calls a
backend: a batch is many requests in flight at once, which the backend batches), and what it holds.

Requests arrive one by one; a backend batches those in flight (vLLM: continuous batching in the
engine; transformers and replay: `MicroBatching`, requests that arrive while a batch runs form the
next batch). A request with `stream` set wants its text as it is generated; without it a batching
backend may answer in one piece.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from core.errors import CoeError
from core.types import ExpertAnswer, FunctionCall, GenerationParams, GenerationRequest, Message, StreamPiece, ToolCall

if TYPE_CHECKING:
    from experts.pool import TieredPool


class Backend(Protocol):
    """Runs experts."""

    name: str
    pool: TieredPool | None  # the tiered memory pool holding its experts; None: the backend manages memory itself

    def astream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        """One request: text pieces in order as they are generated (stop strings already cut, see
        StopScanner; possibly one piece, or none, when `request.stream` is False), then a last
        piece with empty text and the complete ExpertAnswer, whose text is the pieces joined
        (stripped). Closing the iterator or cancelling its consumer stops the generation."""
        ...

    def load(self, expert: str) -> float:
        """Make the expert ready to run; returns the seconds it took (0 when already resident)."""
        ...

    def resident(self) -> dict[str, str]:
        """Expert name -> where it lives now: `device` (instantiated and ready to run), `host` or `disk`."""
        ...


async def complete(backend: Backend, request: GenerationRequest) -> ExpertAnswer:
    """A request's whole answer (the last piece of its stream)."""
    answer = None
    async for piece in backend.astream(request):
        answer = piece.answer or answer
    if answer is None:
        raise RuntimeError(f"backend {backend.name} finished {request.expert}'s request without an answer")
    return answer


def pool_report(backend, where: str = "local") -> dict:
    """What a backend holds and has moved, as plain data: each expert's tier and, for a backend
    with a tiered pool, the bytes per tier against their budgets, the pool's counters and, where
    the pool keeps merged copies of hot experts, the hot rule with each copy's share of recent
    requests, tier and bytes (`hot`). The server's `GET /v1/pool`, its pool metrics and
    `coe experts list --url` read this."""
    report = {"where": where, "backend": backend.name, "residence": backend.resident()}
    pool = getattr(backend, "pool", None)
    if pool is not None:
        report |= pool.report()
    return report


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut generated text before the first stop string; says whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def render_prompt(tokenizer, chat: bool, messages: list[Message], params: GenerationParams | None = None) -> str:
    """The prompt text an expert sees: its chat template (with the request's tools where it uses
    them), or the plain messages for a base without one; a raw prompt (/v1/completions) as it is."""
    if params is not None and params.raw_prompt:
        return messages[-1].content
    plain = [template_message(m) for m in messages]
    if chat and tokenizer.chat_template:
        tools = [t.model_dump(exclude_none=True) for t in params.tools] if params is not None and params.uses_tools else None
        return tokenizer.apply_chat_template(plain, tools=tools, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in plain)


def template_message(message: Message) -> dict:
    """A message as chat templates take it: a tool call's arguments as an object, not JSON text."""
    plain = message.wire()
    for call in plain.get("tool_calls") or []:
        try:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        except ValueError:
            pass  # not JSON: the template gets the text as the model wrote it
    return plain


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Hermes/Qwen-style tool calls in a model's text (`<tool_call>{"name": ..., "arguments":
    {...}}</tool_call>`, the convention experts/capabilities.py requires of a local template):
    the text before the first call, and the calls. A block that is not a JSON object with a
    `name` stays text."""
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except ValueError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = call.get("arguments", call.get("parameters", {}))
            calls.append(ToolCall(function=FunctionCall(
                name=call["name"], arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))))
    if not calls:
        return text, []
    return text[: text.index("<tool_call>")].strip(), calls


def forced_tool_schema(params: GenerationParams) -> dict | None:
    """The JSON Schema of the one call a `required` or named tool_choice forces: {"name": ...,
    "arguments": {...}} over the allowed tools (decoded under it, the answer is that call)."""
    choice = params.tool_choice
    if not params.tools or choice in (None, "auto", "none"):
        return None
    allowed = [t.function for t in params.tools if choice == "required" or t.function.name == choice.function.name]
    if not allowed:
        raise CoeError(f"tool_choice names {choice.function.name!r}, which is not among the request's tools",
                       "name one of the tools")
    shapes = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
               "required": ["name", "arguments"]} for f in allowed]
    return shapes[0] if len(shapes) == 1 else {"anyOf": shapes}


def with_tool_calls(answer: ExpertAnswer, params: GenerationParams, forced: bool = False) -> ExpertAnswer:
    """A local model's answer with its tool calls parsed out of the text (finish_reason
    `tool_calls`); `forced`: the text is one call decoded under forced_tool_schema."""
    if not params.uses_tools:
        return answer
    if forced:
        text, calls = "", []
        try:
            call = json.loads(answer.text)
            calls = [ToolCall(function=FunctionCall(name=call["name"], arguments=json.dumps(call["arguments"])))]
        except (ValueError, KeyError, TypeError):
            text = answer.text  # cut short (max_tokens): no complete call to give
    else:
        text, calls = parse_tool_calls(answer.text)
    if not calls:
        return answer
    return answer.model_copy(update={"text": text, "tool_calls": calls, "finish_reason": "tool_calls"})


class MicroBatching:
    """`astream` for a backend whose `generate` runs a whole batch to completion: requests that
    arrive while a batch runs join the next batch (never one request at a time). A batch that
    fails is retried request by request, so only the culprit fails (a prompt too long, a broken
    expert) and the others get their answers. A request cancelled before its batch starts is
    dropped; once started, its batch finishes."""

    _queue: asyncio.Queue | None = None
    _queue_loop: asyncio.AbstractEventLoop | None = None
    # Batches computing at once: 1 for a backend that computes one batch at a time anyway (torch
    # uses every core), so the next batch gathers everything that arrived meanwhile.
    max_concurrent_batches = 1

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        raise NotImplementedError

    async def agenerate(self, request: GenerationRequest) -> ExpertAnswer:
        loop = asyncio.get_running_loop()
        if self._queue_loop is not loop:  # one batcher per event loop
            self._queue, self._queue_loop = asyncio.Queue(), loop
            loop.create_task(self._batch_forever(self._queue))
        future = loop.create_future()
        self._queue.put_nowait((request, future))
        return await future

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        answer = await self.agenerate(request)  # a batch backend has the text only at the end
        if answer.text:
            yield StreamPiece(text=answer.text)
        yield StreamPiece(answer=answer)

    async def _batch_forever(self, queue: asyncio.Queue) -> None:
        running = asyncio.Semaphore(self.max_concurrent_batches)
        while True:
            await running.acquire()  # a batch forms while the previous one runs: everything that arrived
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            batch = [(r, f) for r, f in batch if not f.done()]  # callers that went away
            if batch:
                asyncio.get_running_loop().create_task(self._run_batch(batch, running))
            else:
                running.release()

    async def _run_batch(self, batch: list[tuple[GenerationRequest, asyncio.Future]], running: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                outcomes = await loop.run_in_executor(None, self.generate, [r for r, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    outcomes = [exc]
                else:  # isolate the culprit: each request alone, so every caller hears its own outcome
                    outcomes = await loop.run_in_executor(None, self._one_by_one, [r for r, _ in batch])
            for (_, future), outcome in zip(batch, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            running.release()

    def _one_by_one(self, requests: list[GenerationRequest]) -> list[ExpertAnswer | Exception]:
        outcomes: list[ExpertAnswer | Exception] = []
        for request in requests:
            try:
                outcomes += self.generate([request])
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


class StopScanner:
    """Streams text past stop strings: `feed` returns the text that can be sent now, holding back
    a tail that may still turn into a stop string; after a stop string, `stopped` is True.
    Leading whitespace is dropped, as non-streamed answers are stripped."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        if not self.sent:
            self.text = self.text.lstrip()
        self.text, self.stopped = cut_at_stop(self.text, self.stops)
        held = 0 if self.stopped else self._partial_stop_length()
        ready = self.text[self.sent: len(self.text) - held]
        self.sent += len(ready)
        return ready

    def flush(self) -> str:
        """What is left at the end of the generation (a held tail that never became a stop)."""
        rest = self.text[self.sent:].rstrip()
        self.sent = len(self.text)
        return rest

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        longest = max((len(s) for s in self.stops), default=1)
        for size in range(min(longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0


def iterate_on_loop(pieces: AsyncIterator, loop: asyncio.AbstractEventLoop) -> Iterator:
    """An async iterator that must run on `loop` (a backend's own loop thread), consumed from a
    plain thread. Closing the iterator cancels the producer there (vLLM then aborts the request)."""
    items: queue.Queue = queue.Queue()
    end = object()

    async def produce() -> None:
        try:
            async for piece in pieces:
                items.put(piece)
            items.put(end)
        except Exception as exc:  # handed to the consumer
            items.put(exc)

    producer = asyncio.run_coroutine_threadsafe(produce(), loop)
    try:
        while (item := items.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        producer.cancel()


_STREAM_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="coe-stream")


async def iterate_in_thread(iterator: Iterator) -> AsyncIterator:
    """A blocking iterator as an async one, each step on a worker thread. If the consumer goes
    away (client disconnect), the iterator is closed once its current step returns."""
    end = object()
    step = None
    try:
        while True:
            step = _STREAM_THREADS.submit(next, iterator, end)
            item = await asyncio.wrap_future(step)
            step = None
            if item is end:
                return
            yield item
    finally:
        if step is not None:
            step.add_done_callback(lambda _: iterator.close())
        else:
            iterator.close()
