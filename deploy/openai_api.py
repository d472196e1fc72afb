"""OpenAI-compatible request and response shapes: chat completions, stream chunks, errors; a
Result rendered once into the body (`chat_completion`, its `coe` field: `describe`), the routing
headers and the metrics (`observe`)."""

from __future__ import annotations

import base64
import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.types import (
    Decision,
    FunctionCall,
    GenerationParams,
    Message,
    NamedToolChoice,
    Query,
    ResponseFormat,
    Result,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)
from deploy import metrics

MAX_PROMPT_CHARS = 32_000  # per message: far beyond the embedded models' context; a guard against floods
MAX_MESSAGES = 256
MAX_STOP_CHARS = 64


# The request fields coe implements, by endpoint (README, "The OpenAI API"), besides the `coe`
# extension (the request models below have exactly these fields: tests/test_api_surface.py). Any other field is a 400 that names it; so is a non-default value of an OpenAI field
# coe does not implement (DEFAULT_ONLY), as OpenAI answers an argument it does not recognise.
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
               "stream", "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "user")
COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                     "stream_options", "logprobs", "user")
EMBEDDING_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")
# OpenAI fields coe accepts only at their default values (None: left out).
DEFAULT_ONLY: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "parallel_tool_calls": (None, True), "functions": (None,), "function_call": (None,), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}), "web_search_options": (None,), "verbosity": (None,),
    "prompt_cache_key": (None,), "safety_identifier": (None,),
    # /v1/completions
    "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
}
CHAT_DEFAULT_ONLY = ("frequency_penalty", "presence_penalty", "logit_bias", "parallel_tool_calls", "functions",
                     "function_call", "audio", "modalities", "prediction", "reasoning_effort", "service_tier", "store",
                     "metadata", "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier")
COMPLETION_DEFAULT_ONLY = ("frequency_penalty", "presence_penalty", "logit_bias", "echo", "best_of", "suffix")
MAX_TOOLS = 128
MAX_CHOICES = 16


def default_only(field: str, value):
    """A field coe does not implement: accepted at its default, else a 400 that names it."""
    if value not in DEFAULT_ONLY[field]:
        raise ValueError(f"coe does not implement `{field}`; leave it out (or at its default)")
    return value


def check_json_schema(schema: dict, where: str) -> None:
    """A 400 for a schema that is not valid JSON Schema (jsonschema's metaschema check)."""
    from jsonschema import SchemaError, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"{where} is not a valid JSON Schema: {exc.message}") from None


class Strict(BaseModel):
    """An OpenAI request object: a field it does not know is an error naming it, and so is a value
    of the wrong JSON type (no "yes" for a boolean, as OpenAI answers it)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    """A content part as newer OpenAI clients send it: {"type": "text", "text": "..."}."""

    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatFunctionCall(Strict):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_PROMPT_CHARS)
    parsed_arguments: Any = None  # the openai client's parse helpers echo it back; not used


class ChatToolCall(Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: ChatFunctionCall


def _present(field: str, schema: dict) -> dict:
    return {"required": [field], "properties": {field: {"not": {"type": "null"}, **schema}}}


# The rules of _shape_of_role, in the OpenAPI schema too, so that clients and schema-driven
# fuzzers see which messages are valid (as OpenAI's schema has one message shape per role).
MESSAGE_SHAPES = {"allOf": [
    {"if": {"properties": {"role": {"const": "assistant"}}},
     "then": {"anyOf": [_present("content", {}), _present("tool_calls", {"minItems": 1})]},
     "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}, "tool_calls": {"type": "null"}}}},
    {"if": {"properties": {"role": {"const": "tool"}}}, "then": _present("tool_call_id", {"minLength": 1})},
]}


class ChatMessage(Strict):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=MESSAGE_SHAPES)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | Annotated[list[TextPart], Field(max_length=64)] | None = None
    name: str | None = Field(None, max_length=64)
    tool_calls: list[ChatToolCall] | None = Field(None, max_length=MAX_TOOLS)  # an assistant turn that called tools
    tool_call_id: str | None = Field(None, max_length=256)  # a tool turn: the call it answers
    # What an assistant message echoed back from a response carries; not used.
    refusal: str | None = None
    annotations: list | None = None
    parsed: Any = None  # the openai client's parse helpers' object

    @model_validator(mode="after")
    def _shape_of_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the call it answers)")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def to_message(self) -> Message:
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
                 for c in self.tool_calls] if self.tool_calls is not None else None
        return Message(role="system" if self.role == "developer" else self.role, content=self.text, tool_calls=calls,
                       tool_call_id=self.tool_call_id, name=self.name)


class StreamOptions(Strict):
    include_usage: bool = False


class CoeOptions(Strict):
    """The `coe` extension of a request body (the openai client's `extra_body={"coe": {...}}`)."""

    cost_threshold: float | None = Field(None, ge=0.0, le=1.0)  # the cost knob, as `model: coe-knn@0.3`
    session: str | None = Field(None, max_length=256)  # keeps a conversation on its expert (as `user`)


def stop_list(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters")
    return stops


class SamplingFields(Strict):
    """What chat and text completions share."""

    model: str = Field("coe", min_length=1, max_length=128)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    coe: CoeOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None

    _stop = field_validator("stop")(classmethod(lambda cls, stop: stop_list(stop)))

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        """The schema says what the validators hold: a field coe does not implement takes only its defaults."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        for name, prop in schema.get("properties", {}).items():
            if name in DEFAULT_ONLY:
                prop.clear()
                prop.update(enum=list(DEFAULT_ONLY[name]), description="not implemented: only its default is accepted")
        return schema

    @field_validator("frequency_penalty", "presence_penalty", "logit_bias")
    @classmethod
    def _default_only(cls, value, info):
        return default_only(info.field_name, value)

    def query(self, messages: list[Message], max_tokens: int, **params) -> Query:
        options = self.coe or CoeOptions()
        params = GenerationParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  stop=self.stop or [], seed=self.seed, n=self.n, **params)
        return Query(messages=messages, params=params, policy=self.model, cost_threshold=options.cost_threshold,
                     session=options.session or self.user)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, json_schema_extra={"contains": {
        "required": ["role", "content"], "properties": {"role": {"const": "user"}, "content": {"anyOf": [
            {"type": "string", "pattern": r"\S"},
            {"type": "array", "contains": {"required": ["text"], "properties": {"text": {"pattern": r"\S"}}}}]}}}})
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict | None = None
    web_search_options: dict | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator(*(f for f in CHAT_DEFAULT_ONLY if f not in ("frequency_penalty", "presence_penalty", "logit_bias")))
    @classmethod
    def _chat_default_only(cls, value, info):
        return default_only(info.field_name, value)

    @field_validator("messages")
    @classmethod
    def _has_user_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.text.strip() for m in messages):
            raise ValueError("messages must contain a non-empty user message")
        if sum(len(m.text) for m in messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages are longer than {MAX_PROMPT_CHARS} characters in all")
        return messages

    @field_validator("tools")
    @classmethod
    def _tool_schemas(cls, tools: list[ToolSpec] | None) -> list[ToolSpec] | None:
        for i, tool in enumerate(tools or []):
            check_json_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        names = [t.function.name for t in tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tool names must be unique")
        return tools

    @field_validator("response_format")
    @classmethod
    def _response_schema(cls, response_format: ResponseFormat | None) -> ResponseFormat | None:
        if response_format is not None and response_format.type == "json_schema":
            if response_format.json_schema is None or not response_format.json_schema.json_schema:
                raise ValueError("a json_schema response_format needs json_schema.schema")
            check_json_schema(response_format.json_schema.json_schema, "response_format.json_schema.schema")
        return response_format

    # Fields validate in the order they are declared: `tools` and `logprobs` are in info.data here.
    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice, info):
        tools = info.data.get("tools") or []
        if choice is not None and not tools:
            raise ValueError("tool_choice is only allowed when tools are given")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        return choice

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top, info):
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    def to_query(self) -> Query:
        return self.query([m.to_message() for m in self.messages], self.max_completion_tokens or self.max_tokens or 256,
                          logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0, tools=self.tools,
                          tool_choice=self.tool_choice, response_format=self.response_format)


class CompletionRequest(SamplingFields):
    """/v1/completions: the prompt as it is, no chat template (as vLLM's server does it)."""

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=32)]
    max_tokens: int = Field(16, ge=1, le=4096)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)  # alternatives per token, as the completions API counts them
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "best_of", "suffix")
    @classmethod
    def _completion_default_only(cls, value, info):
        return default_only(info.field_name, value)

    @field_validator("prompt")
    @classmethod
    def _one_stream(cls, prompt, info):
        if any(not p.strip() for p in ([prompt] if isinstance(prompt, str) else prompt)):
            raise ValueError("a prompt must not be blank")
        if info.data.get("stream") and isinstance(prompt, list) and len(prompt) > 1:
            raise ValueError("stream one prompt at a time (a list of prompts is not streamed)")
        return prompt

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_queries(self) -> list[Query]:
        return [self.query([Message(role="user", content=prompt)], self.max_tokens, raw_prompt=True,
                           logprobs=self.logprobs is not None, top_logprobs=self.logprobs or 0)
                for prompt in self.prompts]


class EmbeddingRequest(Strict):
    model: str = Field(min_length=1, max_length=128)
    input: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def response_id(query: Query, kind: str = "chatcmpl") -> str:
    """A response's id, as clients see it and send it back with feedback (`cmpl` for text completions)."""
    return f"{kind}-{query.id}"


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


def message_body(text: str, tool_calls: list[ToolCall] | None) -> dict:
    """An assistant message: content (None beside tool calls without text, as OpenAI sends it)."""
    message: dict = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = [c.model_dump() for c in tool_calls]
    return message


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict | None:
    return {"content": [t.model_dump() for t in logprobs]} if logprobs is not None else None


def chat_choices(result: Result) -> list[dict]:
    """Every choice of a Result: the answer itself, then a request's choices 2..n."""
    first = {"index": 0, "message": message_body(result.text, result.tool_calls), "finish_reason": result.finish_reason,
             "logprobs": chat_logprobs(result.logprobs)}
    return [first] + [{"index": i, "message": message_body(c.text, c.tool_calls), "finish_reason": c.finish_reason,
                       "logprobs": chat_logprobs(c.logprobs)} for i, c in enumerate(result.more_choices, 1)]


def chat_completion(result: Result, model: str, response: str, cache: dict | None = None) -> dict:
    """A chat.completion body; `response`: its id (response_id)."""
    return {
        "id": response,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": chat_choices(result),
        "usage": usage_body(result.usage),
        "coe": describe(result, cache),
    }


def completion_logprobs(logprobs: list[TokenLogprob] | None) -> dict | None:
    """Logprobs as the completions API writes them: parallel lists, alternatives as {token: logprob}."""
    if logprobs is None:
        return None
    offsets, at = [], 0
    for t in logprobs:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in logprobs], "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs} for t in logprobs], "text_offset": offsets}


def text_completion(results: list[Result], model: str, response: str) -> dict:
    """A text_completion body over one Result per prompt (n choices each, indexed prompt by prompt)."""
    choices = []
    for result in results:
        for text, finish, logprobs in [(result.text, result.finish_reason, result.logprobs),
                                       *((c.text, c.finish_reason, c.logprobs) for c in result.more_choices)]:
            choices.append({"index": len(choices), "text": text, "finish_reason": finish,
                            "logprobs": completion_logprobs(logprobs)})
    usage = Usage(prompt_tokens=sum(r.usage.prompt_tokens for r in results),
                  completion_tokens=sum(r.usage.completion_tokens for r in results))
    body = {"id": response, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_body(usage)}
    body["coe"] = describe(results[0]) if len(results) == 1 else [describe(r) for r in results]
    return body


def embeddings_body(vectors, model: str, encoding: str, prompt_tokens: int) -> dict:
    """OpenAI's embeddings response: one entry per input, floats or base64 of little-endian float32."""
    def encoded(vector):
        if encoding == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode()
        return [float(x) for x in vector]

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


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


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None, index: int = 0,
          logprobs: dict | None = None, **extra) -> str:
    """One server-sent event of a chat.completion.chunk stream."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}], **extra}
    return f"data: {json.dumps(body)}\n\n"


def closing_chunks(cid: str, created: int, model: str, result: Result) -> list[str]:
    """What a stream sends once the Result is there, after the answer's text: its tool calls (each
    call whole in one delta, indexed as OpenAI streams them), the request's choices 2..n each in
    one piece, then the finish chunk with the logprobs and the `coe` field."""
    events = []
    if result.tool_calls:
        calls = [{"index": i, **c.model_dump()} for i, c in enumerate(result.tool_calls)]
        events.append(chunk(cid, created, model, {"tool_calls": calls}))
    for i, choice in enumerate(result.more_choices, 1):
        events.append(chunk(cid, created, model, message_body(choice.text, choice.tool_calls), index=i))
        events.append(chunk(cid, created, model, {}, choice.finish_reason, index=i, logprobs=chat_logprobs(choice.logprobs)))
    events.append(chunk(cid, created, model, {}, result.finish_reason, logprobs=chat_logprobs(result.logprobs),
                        coe=describe(result)))
    return events


def completion_chunk(cid: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None, index: int = 0, **extra) -> str:
    """One server-sent event of a streamed text completion."""
    body = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}], **extra}
    return f"data: {json.dumps(body)}\n\n"


def completion_closing_chunks(cid: str, created: int, model: str, result: Result) -> list[str]:
    """A streamed text completion's end: choices 2..n each in one piece, then the finish chunk with
    the logprobs and the `coe` field."""
    events = [completion_chunk(cid, created, model, c.text, c.finish_reason, completion_logprobs(c.logprobs), index=i)
              for i, c in enumerate(result.more_choices, 1)]
    events.append(completion_chunk(cid, created, model, "", result.finish_reason, completion_logprobs(result.logprobs),
                                   coe=describe(result)))
    return events


def usage_chunk(cid: str, created: int, model: str, usage: Usage, kind: str = "chat.completion.chunk") -> str:
    """The extra last chunk of stream_options.include_usage: no choices, the usage."""
    body = {"id": cid, "object": kind, "created": created, "model": model, "choices": [],
            "usage": usage_body(usage)}
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def observe(result: Result, seconds: float, stream: bool, endpoint: str = "chat") -> None:
    """Count one answered chat (or text) completion."""
    policy = result.decision.policy
    metrics.REQUESTS.labels(endpoint, policy, "200").inc()
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
