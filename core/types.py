"""Typed data that flows through the pipeline: Query -> Decision -> Plan -> Result.

Plain pydantic models, no torch and no Ray, so the same objects travel in-process,
through Ray Serve and in offline evaluation.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an API object: an unknown field is an error

    name: str
    arguments: str  # JSON text, as the model wrote it (OpenAI's shape)


class ToolCall(BaseModel):
    """A call of one of the request's tools, as an assistant message carries it."""

    model_config = ConfigDict(extra="forbid")  # an API object: an unknown field is an error

    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None

    def wire(self) -> dict:
        """The message as OpenAI's API and chat templates take it (unset fields left out)."""
        return self.model_dump(exclude_none=True)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})  # a JSON Schema
    strict: bool | None = None


class ToolSpec(BaseModel):
    """A tool the model may call (OpenAI's `tools` entry)."""

    model_config = ConfigDict(extra="forbid")  # an API object: an unknown field is an error

    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    name: str = Field("response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict = Field(default_factory=dict, alias="schema")  # the JSON Schema the answer follows
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text` (no constraint), `json_object` (any JSON object) or `json_schema` (an answer that
    validates against the schema)."""

    model_config = ConfigDict(extra="forbid")  # an API object: an unknown field is an error

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class Capabilities(BaseModel):
    """What an expert can do beyond plain text (experts/capabilities.py decides it per expert);
    a request that needs one is routed only among experts that have it."""

    model_config = ConfigDict(frozen=True)

    tools: bool = False  # `tools` passed to the model, its calls parsed back into tool_calls
    json_output: bool = False  # `response_format` json_object / json_schema enforced while decoding
    logprobs: bool = False  # `logprobs` / `top_logprobs` of the sampled tokens
    n: bool = False  # several choices per request

    def lacks(self, needs: list[str]) -> list[str]:
        return [need for need in needs if not getattr(self, CAPABILITY_OF[need])]


# The request field that needs each capability (errors name the field).
CAPABILITY_OF = {"tools": "tools", "response_format": "json_output", "logprobs": "logprobs", "n": "n"}


class GenerationParams(BaseModel):
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)  # choices per request
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)  # alternatives per token, with logprobs
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None  # None: `auto` where tools are given
    response_format: ResponseFormat | None = None
    # The last user message is the prompt as it is, with no chat template (/v1/completions).
    raw_prompt: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def structured(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    def needs(self) -> list[str]:
        """The request fields that need an expert capability (CAPABILITY_OF), in that order."""
        wanted = {"tools": self.uses_tools, "response_format": self.structured, "logprobs": self.logprobs,
                  "n": self.n > 1}
        return [field for field, needed in wanted.items() if needed]

    @property
    def single_expert(self) -> bool:
        """Tool calls, structured output, logprobs, several choices and raw prompts are one expert's
        answer as it came: no vote, synthesis or cascade over them."""
        return bool(self.needs()) or self.raw_prompt


class Query(BaseModel):
    """One user request, normalised: what to answer, how, and under which routing policy."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    messages: list[Message]
    params: GenerationParams = Field(default_factory=GenerationParams)
    policy: str | None = None  # None: the configured default policy; `NAME@0.3` sets the cost knob too
    # The cost knob for this request (RouteLLM-style): the cheapest expert whose predicted success
    # is within this of the best answers. None: the policy's own setting.
    cost_threshold: float | None = Field(None, ge=0.0, le=1.0)
    session: str | None = None  # a conversation's key (the OpenAI `user` field or x-coe-session)
    trace: dict[str, str] = Field(default_factory=dict)  # the ingress span's context (core/tracing.py carrier)

    @field_validator("messages")
    @classmethod
    def _has_user_text(cls, messages: list[Message]) -> list[Message]:
        if not messages:
            raise ValueError("messages must not be empty")
        if not any(m.role == "user" and m.content.strip() for m in messages):
            raise ValueError("messages must contain a non-empty user message")
        return messages

    @classmethod
    def from_text(cls, text: str, **kwargs) -> Query:
        return cls(messages=[Message(role="user", content=text)], **kwargs)

    @property
    def text(self) -> str:
        """The text routers look at: the last user message."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    @property
    def history(self) -> list[str]:
        """The conversation's earlier user turns, most recent last (routers weigh them down)."""
        turns = [m.content for m in self.messages if m.role == "user"]
        return turns[:-1]


class ExpertScore(BaseModel):
    expert: str
    score: float


class Shadow(BaseModel):
    """A candidate router's decision for the same query, taken alongside and never answered."""

    policy: str
    chosen: list[str]
    agrees: bool  # it chose the serving decision's experts


class Decision(BaseModel):
    """A router's verdict for one query: experts ranked best first, of which the first k run."""

    query_id: str
    policy: str
    ranked: list[ExpertScore]
    k: int = Field(1, ge=1)
    aggregator: str = "passthrough"
    aggregator_expert: str | None = None  # the expert that writes a synthesis (aggregator `synthesis`)
    explanation: str = ""
    # Adaptive k (a cascade): with a threshold, the engine calls the chosen experts one at a time,
    # the next only while the best predicted success among those that answered is below it.
    cascade: float | None = None
    shadow: Shadow | None = None  # the policy's shadow router, if it has one

    @property
    def chosen(self) -> list[ExpertScore]:
        return self.ranked[: self.k]


class PoolState(BaseModel):
    """What the planner knows of the memory pool: where each expert is (`device`, `host`,
    `disk`; an unlisted expert is on disk), its size in bytes, and a LoRA expert's base."""

    residence: dict[str, str] = Field(default_factory=dict)
    sizes: dict[str, int] = Field(default_factory=dict)
    parents: dict[str, str] = Field(default_factory=dict)

    def tier(self, expert: str) -> str:
        return self.residence.get(expert, "disk")


class StreamStart(BaseModel):
    """The first event of a streamed answer: the routing decision, once its expert is loaded."""

    decision: Decision
    load_seconds: float = 0.0


class PlanGroup(BaseModel):
    """One expert and the queries it answers in this batch."""

    expert: str
    query_ids: list[str]
    base: str | None = None  # the base model it runs on (itself for a full model)


class Plan(BaseModel):
    """Groups in execution order, and what they bring to the device."""

    groups: list[PlanGroup]
    loads: int = 0  # experts (and bases) not on the device when the plan starts: each loads once
    load_bytes: int = 0  # bytes those loads bring to the device
    read_bytes: int = 0  # of which bytes read from disk first

    @property
    def order(self) -> list[str]:
        """The experts in the order they run: what the pool is told to expect."""
        return [g.expert for g in self.groups]

    def stages(self) -> list[list[PlanGroup]]:
        """Consecutive groups on the same base: one forward pass serves a stage's LoRA experts."""
        stages: list[list[PlanGroup]] = []
        for group in self.groups:
            if stages and group.base is not None and stages[-1][0].base == group.base:
                stages[-1].append(group)
            else:
                stages.append([group])
        return stages


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    """One generated token with its logprob and the most likely alternatives (OpenAI's shape)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Choice(BaseModel):
    """One of several answers to a request with n > 1 (the first is the ExpertAnswer itself)."""

    text: str
    finish_reason: FinishReason = "stop"
    tool_calls: list[ToolCall] | None = None
    logprobs: list[TokenLogprob] | None = None


class ExpertAnswer(BaseModel):
    expert: str
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0  # of every choice
    finish_reason: FinishReason = "stop"
    cost: float = 0.0  # dollars, from the expert's prices (core/costs.py)
    tool_calls: list[ToolCall] | None = None  # the model called tools (finish_reason tool_calls)
    logprobs: list[TokenLogprob] | None = None  # with params.logprobs
    more_choices: list[Choice] = Field(default_factory=list)  # choices 2..n of a request with n > 1


@dataclass(frozen=True)
class GenerationRequest:
    expert: str
    messages: list[Message]
    params: GenerationParams
    query_id: str | None = None  # the query this answers (replay backends look recorded answers up by it)
    stream: bool = False  # the caller forwards text as it comes; False: a batching backend may answer in one piece
    trace: dict | None = None  # the span context it runs under (core/tracing.py), across processes


@dataclass(frozen=True)
class StreamPiece:
    """One step of a streamed generation: new text; the last piece carries the complete answer."""

    text: str = ""
    answer: ExpertAnswer | None = None


class Incident(BaseModel):
    """Something that went wrong while answering and what was done about it (response metadata)."""

    expert: str
    kind: Literal["error", "timeout", "cooldown", "fallback", "aggregator_error"]
    detail: str = ""
    attempt: int = 0  # 1 for the first try of an expert, 2 for its first retry, ...


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Result(BaseModel):
    query_id: str
    text: str
    decision: Decision
    answers: list[ExpertAnswer]
    usage: Usage
    finish_reason: FinishReason = "stop"
    tool_calls: list[ToolCall] | None = None  # the final answer's (a single expert's: GenerationParams.single_expert)
    logprobs: list[TokenLogprob] | None = None
    more_choices: list[Choice] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per stage, for the batch
    incidents: list[Incident] = Field(default_factory=list)  # failures, retries and fallbacks on the way
    aggregator_answer: ExpertAnswer | None = None  # the synthesis the aggregator expert wrote from the answers

    @property
    def aggregated_by(self) -> str | None:
        return self.aggregator_answer.expert if self.aggregator_answer is not None else None

    @property
    def cost(self) -> float:
        """Dollars for every expert call of this request (core/costs.py)."""
        return sum(a.cost for a in self.answers) + (self.aggregator_answer.cost if self.aggregator_answer else 0.0)
    batch_size: int = 1  # queries in the batch it ran in (queueing made visible)

    @property
    def experts(self) -> list[str]:
        """The experts that answered (after any fallback)."""
        return [a.expert for a in self.answers]

    @property
    def fell_back(self) -> bool:
        """An answer came from an expert other than the router's choice."""
        return {a.expert for a in self.answers} != {s.expert for s in self.decision.chosen}
