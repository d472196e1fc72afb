"""OpenAI-compatible request and response shapes: chat completions, stream chunks, errors; a
Result rendered once into the body (`chat_completion`, its `coe` field: `describe`), the routing
headers and the metrics (`observe`)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.types import Decision, GenerationParams, Message, Query, Result, Usage
from deploy import metrics

MAX_PROMPT_CHARS = 32_000  # per message: far beyond the embedded models' context; a guard against floods
MAX_MESSAGES = 256
MAX_STOP_CHARS = 64


class TextPart(BaseModel):
    """A content part as newer OpenAI clients send it: {"type": "text", "text": "..."}."""

    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | Annotated[list[TextPart], Field(max_length=64)]
    name: str | None = Field(None, max_length=64)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CoeOptions(BaseModel):
    """The `coe` extension of a request body (the openai client's `extra_body={"coe": {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    cost_threshold: float | None = Field(None, ge=0.0, le=1.0)  # the cost knob, as `model: coe-knn@0.3`
    session: str | None = Field(None, max_length=256)  # keeps a conversation on its expert (as `user`)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, metadata, ...)

    model: str = Field("coe", min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    coe: CoeOptions | None = None

    @field_validator("messages")
    @classmethod
    def _has_user_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.text.strip() for m in messages):
            raise ValueError("messages must contain a non-empty user message")
        if sum(len(m.text) for m in messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages are longer than {MAX_PROMPT_CHARS} characters in all")
        return messages

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters")
        return stops

    def to_query(self) -> Query:
        params = GenerationParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature, top_p=self.top_p, stop=self.stop or [], seed=self.seed,
        )
        messages = [Message(role="system" if m.role == "developer" else m.role, content=m.text) for m in self.messages]
        options = self.coe or CoeOptions()
        return Query(messages=messages, params=params, policy=self.model, cost_threshold=options.cost_threshold,
                     session=options.session or self.user)


def response_id(query: Query) -> str:
    """A response's id, as clients see it and send it back with feedback."""
    return f"chatcmpl-{query.id}"


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a score for an earlier response (1: right or liked, 0: wrong)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    score: float = Field(ge=0.0, le=1.0)


def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def describe(result: Result, cache: dict | None = None) -> dict:
    """The `coe` field of a response (and `coe ask --json`): answer, experts with scores, timings;
    `cache`: how a cached answer was found (it is then the earlier request's description)."""
    chosen = {s.expert for s in result.decision.chosen}
    return {
        "answer": result.text,
        "policy": result.decision.policy,
        "experts": [{"name": s.expert, "score": s.score, "chosen": s.expert in chosen} for s in result.decision.ranked],
        "aggregator": result.decision.aggregator,
        "aggregated_by": result.aggregated_by,
        "explanation": result.decision.explanation,
        "answered_by": result.experts,
        "fallback": result.fell_back,
        "incidents": [i.model_dump() for i in result.incidents],
        "usage": usage_body(result.usage),
        "finish_reason": result.finish_reason,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "batch": result.batch_size,
        "shadow": result.decision.shadow.model_dump() if result.decision.shadow else None,
        "cost": round(result.cost, 8),
        "id": result.query_id,
    } | ({"cache": cache} if cache is not None else {})


def chat_completion(result: Result, model: str, response: str, cache: dict | None = None) -> dict:
    """A chat.completion body; `response`: its id (response_id)."""
    return {
        "id": response,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": usage_body(result.usage),
        "coe": describe(result, cache),
    }


def routing_headers(decision: Decision, load_seconds: float, result: Result | None = None) -> dict:
    """Routing metadata as response headers: policy, chosen experts with scores, aggregator, load
    time; once answered, who answered and whether it was a fallback."""
    headers = {
        "x-coe-policy": decision.policy,
        "x-coe-experts": ",".join(s.expert for s in decision.chosen),
        "x-coe-scores": ",".join(f"{s.expert}={s.score:.4f}" for s in decision.ranked),
        "x-coe-aggregator": decision.aggregator,
        "x-coe-load-seconds": f"{load_seconds:.4f}",
    }
    if result is not None:
        headers["x-coe-answered-by"] = ",".join(result.experts)
        headers["x-coe-fallback"] = str(result.fell_back).lower()
    return headers


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None, **extra) -> str:
    """One server-sent event of a chat.completion.chunk stream."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
    return f"data: {json.dumps(body)}\n\n"


def usage_chunk(cid: str, created: int, model: str, usage: Usage) -> str:
    """The extra last chunk of stream_options.include_usage: no choices, the usage."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage_body(usage)}
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def observe(result: Result, seconds: float, stream: bool) -> None:
    """Count one answered chat completion."""
    policy = result.decision.policy
    metrics.REQUESTS.labels("chat", policy, "200").inc()
    metrics.LATENCY.labels(policy, str(stream).lower()).observe(seconds)
    for choice in result.decision.chosen:
        metrics.ROUTED.labels(policy, choice.expert).inc()
    for expert in result.experts:
        metrics.ANSWERED.labels(policy, expert).inc()
        metrics.EXPERT_LATENCY.labels(expert).observe(result.timings.get("generate", 0.0))
        metrics.LOAD.labels(expert).observe(result.timings.get("load", 0.0))
    for incident in result.incidents:
        metrics.INCIDENTS.labels(incident.expert, incident.kind).inc()
    metrics.BATCH.observe(result.batch_size)
    if result.fell_back:
        metrics.FALLBACKS.labels(policy).inc()
    shadow = result.decision.shadow
    if shadow is not None:
        metrics.SHADOW.labels(policy, shadow.policy, str(shadow.agrees).lower()).inc()
    metrics.TOKENS.labels("prompt").inc(result.usage.prompt_tokens)
    metrics.TOKENS.labels("completion").inc(result.usage.completion_tokens)
