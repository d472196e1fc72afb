"""Failing experts: retry, fall back to the next-ranked expert, cool down an expert that keeps
failing. One loop (`SlotRunner.answer`) for every answer the engine needs: a batch's, a single
request's and a stream's.

Plain Python over the Backend protocol (no Ray, no torch), in-process and on Serve alike. What
happened is recorded as Incidents, which the engine puts in the Result (and the HTTP API in its
response metadata).

Semantics (defaults in ResilienceConfig, like LiteLLM's: 1 retry, 3 failures -> 5 s cooldown):
- An attempt is one backend call for one answer slot (the backend batches slots in flight; a
  batch that fails is retried request by request there, so only the culprit fails).
- Every failed attempt counts against its expert; `cooldown_failures` consecutive failures put it
  in cooldown for `cooldown_seconds`: it is skipped (not retried) while cooling.
- After its attempts, a slot moves to the next-ranked expert of its Decision that is not already
  answering the query and not cooling. A query for one named expert has nothing to fall back to:
  ExpertsFailedError (HTTP 503); the other queries of its batch still get answers.
- A client error (a CoeError below 500, e.g. a prompt too long) is the request's fault: raised at
  once, never retried, never counted against the expert.
- Timeouts: a call that does not finish within `timeout_seconds` (a streamed call: that does not
  send its first text within it) counts as a failure, and is cancelled (the backend stops
  generating; a batch already running on a batch backend finishes in its thread).
- A slot whose text goes to the client as it is generated (`emit`) falls back only before its
  first text: text that reached the client cannot be taken back, so a failure after it ends the
  answer with ExpertsFailedError (503: e.g. its expert-pool replica died).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from core import tracing
from core.config import ResilienceConfig
from core.errors import CoeError, ExpertsFailedError
from core.types import Decision, ExpertAnswer, GenerationRequest, Incident, Message, Query
from experts.backends.base import Backend


class ExpertTimeoutError(TimeoutError):
    pass


class Cooldowns:
    """Consecutive failures per expert; `failures` of them in a row cool the expert for `seconds`."""

    def __init__(self, failures: int = 3, seconds: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.failures = failures
        self.seconds = seconds
        self.clock = clock
        self._count: dict[str, int] = defaultdict(int)
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def cooling(self, expert: str) -> bool:
        return self._until.get(expert, 0.0) > self.clock()

    def failure(self, expert: str) -> bool:
        """Count a failure; True when it starts a cooldown."""
        with self._lock:
            self._count[expert] += 1
            if self._count[expert] < self.failures:
                return False
            self._count[expert] = 0
            self._until[expert] = self.clock() + self.seconds
            return True

    def success(self, expert: str) -> None:
        with self._lock:
            self._count[expert] = 0

    def cooling_experts(self) -> list[str]:
        now = self.clock()
        return sorted(e for e, until in self._until.items() if until > now)


@dataclass(eq=False)
class Slot:
    """One answer a query needs (one per expert called, plus an aggregator's synthesis) and the
    experts tried for it. `siblings`: every slot of the same query, itself included."""

    query: Query
    decision: Decision
    expert: str
    messages: list[Message] | None = None  # None: the query's own (an aggregator slot writes its own)
    emit: bool = False  # its text goes to the client as it is generated
    fallback: bool = True  # an aggregator slot does not fall back to another expert
    tried: list[str] = field(default_factory=list)
    siblings: list[Slot] = field(default_factory=list)

    def request(self) -> GenerationRequest:
        return GenerationRequest(expert=self.expert, messages=self.messages or self.query.messages,
                                 params=self.query.params, query_id=self.query.id, stream=self.emit,
                                 trace=tracing.carrier() or None)


TextSink = Callable[[str], Awaitable[None]]


class SlotRunner:
    def __init__(self, backend: Backend, settings: ResilienceConfig | None = None, cooldowns: Cooldowns | None = None):
        self.backend = backend
        self.settings = settings or ResilienceConfig()
        self.cooldowns = cooldowns or Cooldowns(self.settings.cooldown_failures, self.settings.cooldown_seconds)

    async def answer(self, slot: Slot, record: Callable[[Incident], None], on_text: TextSink | None = None) -> ExpertAnswer:
        """The slot's answer after retries and fallback, its text sent to `on_text` as it comes
        when the slot emits. Raises the request's CoeError, or ExpertsFailedError when no expert
        is left (or one failed after its text reached the client)."""
        while True:
            self._skip_cooling(slot, record)
            for attempt in range(1, self.settings.retries + 2):
                started = False

                async def sent(text: str) -> None:
                    nonlocal started
                    started = True
                    await on_text(text)

                try:
                    answer = await self._call(slot, sent if slot.emit and on_text is not None else None)
                except CoeError as exc:
                    if exc.status_code < 500:
                        raise  # the request's fault: no retry, no fallback
                    failure: Exception = exc
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # any other backend failure is the expert's failure here
                    failure = exc
                else:
                    self.cooldowns.success(slot.expert)
                    return answer
                if started:  # text reached the client: nothing to fall back to, the expert failed (503)
                    self.cooldowns.failure(slot.expert)
                    raise ExpertsFailedError(f"expert {slot.expert} failed mid-stream: {one_line(failure)}",
                                             "retry the request") from failure
                if self._failed(slot.expert, failure, attempt, record):
                    break
            self._fall_back(slot, record)

    async def _call(self, slot: Slot, on_text: TextSink | None) -> ExpertAnswer:
        """One attempt: the backend's stream for the slot, within the timeout (of the whole call,
        or of its first text when the text is sent on)."""
        timeout = self.settings.timeout_seconds
        with tracing.span("expert", carrier=slot.query.trace, expert=slot.expert, query=slot.query.id, stream=slot.emit):
            return await self._attempt(slot, on_text, timeout)

    async def _attempt(self, slot: Slot, on_text: TextSink | None, timeout: float | None) -> ExpertAnswer:
        pieces = self.backend.astream(slot.request())
        answer = None
        try:
            async with asyncio.timeout(timeout) as deadline:
                async for piece in pieces:
                    if piece.text and on_text is not None:
                        deadline.reschedule(None)  # streaming: the timeout bounds the wait for the first text
                        await on_text(piece.text)
                    answer = piece.answer or answer
        except TimeoutError:
            raise ExpertTimeoutError(f"no answer within {timeout:g} s") from None
        finally:
            await pieces.aclose()
        if answer is None:
            raise RuntimeError(f"the backend finished {slot.expert}'s request without an answer")
        return answer

    def _failed(self, expert: str, exc: Exception, attempt: int, record: Callable[[Incident], None]) -> bool:
        """Record a failed attempt; True when the expert is now cooling (no more attempts)."""
        kind = "timeout" if isinstance(exc, TimeoutError) else "error"
        record(Incident(expert=expert, kind=kind, detail=one_line(exc), attempt=attempt))
        if self.cooldowns.failure(expert):
            record(Incident(expert=expert, kind="cooldown",
                            detail=f"{self.settings.cooldown_failures} failures in a row; "
                                   f"skipped for {self.settings.cooldown_seconds:g} s"))
            return True
        return False

    def _next_expert(self, slot: Slot) -> str | None:
        if not (self.settings.fallback and slot.fallback):
            return None
        # Experts already answering this query, in another slot of this round or another round.
        busy = {s.expert for s in slot.siblings if s is not slot}
        busy |= {s.expert for s in slot.decision.chosen} - {slot.expert}
        candidates = [s.expert for s in slot.decision.ranked if s.expert not in slot.tried and s.expert not in busy]
        return next((e for e in candidates if not self.cooldowns.cooling(e)), None)

    def _fall_back(self, slot: Slot, record: Callable[[Incident], None]) -> None:
        """Move a failed slot to the next-ranked expert; ExpertsFailedError when none is left."""
        slot.tried.append(slot.expert)
        following = self._next_expert(slot)
        if following is None:
            raise ExpertsFailedError(f"expert {slot.expert} failed and no other expert can answer this query",
                                     "retry later, or ask a routing policy (model coe) instead of one expert")
        record(Incident(expert=following, kind="fallback", detail=f"answers instead of {slot.expert}"))
        slot.expert = following

    def _skip_cooling(self, slot: Slot, record: Callable[[Incident], None]) -> None:
        """Leave a cooling expert for the next-ranked one that is not; a slot whose every candidate
        is cooling keeps its expert (trying beats failing outright)."""
        if self.cooldowns.cooling(slot.expert):
            following = self._next_expert(slot)
            if following is not None:
                record(Incident(expert=following, kind="fallback",
                                detail=f"answers instead of {slot.expert}, which is cooling down"))
                slot.tried.append(slot.expert)
                slot.expert = following


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
