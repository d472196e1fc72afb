"""Typed data that flows through the pipeline: Query -> Decision -> Plan -> Result.

Plain pydantic models, no torch and no Ray, so the same objects travel in-process,
through Ray Serve and in offline evaluation.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerationParams(BaseModel):
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


class ExpertAnswer(BaseModel):
    expert: str
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length"] = "stop"
    cost: float = 0.0  # dollars, from the expert's prices (core/costs.py)


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
    finish_reason: Literal["stop", "length"] = "stop"
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
