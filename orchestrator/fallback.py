"""Failing experts: retry, fall back to the next-ranked expert, cool down an expert that keeps
failing, and fall back to the best single answer when the aggregator fails.

Plain Python over the Backend protocol (no Ray, no torch): the pipeline calls it for every batch
and every stream, in-process and on Serve alike. What happened is returned as Incidents, which
the pipeline puts in the Result (and the HTTP API in its response metadata).

Semantics (defaults in ResilienceConfig, like LiteLLM's: 1 retry, 3 failures -> 5 s cooldown):
- An attempt is one backend call for one expert's requests. A batch mixing experts is tried once
  as a whole; if it fails, each expert's requests are tried alone (the culprit is isolated; the
  mixed try does not count as an attempt of any expert), up to 1 + retries attempts each.
- Every failed attempt counts against its expert; `cooldown_failures` consecutive failures put it
  in cooldown for `cooldown_seconds`: it is skipped (not retried) while cooling.
- After its attempts, a query's slot moves to the next-ranked expert of its Decision that is not
  already answering it and not cooling. A query for one named expert has nothing to fall back to:
  it fails with ExpertsFailedError (HTTP 503) and the other queries of its batch still get answers.
- Timeouts: a backend call that does not return within `timeout_seconds` counts as a failure; the
  call itself cannot be interrupted and finishes in its worker thread.
- `agenerate` (one query as it arrives, Pipeline.arun) applies the same rules per answer slot over
  the backend's `agenerate`; there a timeout cancels the call (the backend stops generating).
- A stream falls back only before its first piece of text: text that reached the client cannot be
  taken back, so a failure after it ends the stream with ExpertsFailedError (503: e.g. its
  expert-pool replica died).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from core.config import ResilienceConfig
from core.errors import CoeError, ExpertsFailedError
from core.types import Decision, ExpertAnswer, GenerationRequest, Incident, Query, StreamPiece
from experts.backends.base import Backend
from orchestrator.aggregators import aggregate as default_aggregate


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


@dataclass
class _Slot:
    """One answer a query needs (k slots for k chosen experts) and the experts tried for it."""

    query: Query
    decision: Decision
    index: int
    expert: str
    tried: list[str] = field(default_factory=list)

    def request(self) -> GenerationRequest:
        return GenerationRequest(expert=self.expert, messages=self.query.messages, params=self.query.params,
                                 query_id=self.query.id)


class FallbackRunner:
    def __init__(self, backend: Backend, settings: ResilienceConfig | None = None, cooldowns: Cooldowns | None = None,
                 aggregate: Callable[[Decision, list[ExpertAnswer]], str] = default_aggregate):
        self.backend = backend
        self.settings = settings or ResilienceConfig()
        self.cooldowns = cooldowns or Cooldowns(self.settings.cooldown_failures, self.settings.cooldown_seconds)
        self._aggregate = aggregate
        self._workers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="coe-expert")

    # -- one backend call ------------------------------------------------------------------

    def _call(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        if self.settings.timeout_seconds is None:
            return self.backend.generate(requests)
        future = self._workers.submit(self.backend.generate, requests)
        try:
            return future.result(timeout=self.settings.timeout_seconds)
        except FutureTimeout:
            raise ExpertTimeoutError(f"no answer within {self.settings.timeout_seconds:g} s") from None

    def load(self, expert: str) -> float:
        """Load ahead of generation; a failing load is left for generate to retry and fall back from."""
        try:
            return self.backend.load(expert)
        except Exception:
            return 0.0

    def _failed(self, expert: str, exc: Exception, attempt: int, record: Callable[[Incident], None]) -> bool:
        """Record a failed attempt; True when the expert is now cooling (no more attempts)."""
        kind = "timeout" if isinstance(exc, TimeoutError) else "error"
        record(Incident(expert=expert, kind=kind, detail=_one_line(exc), attempt=attempt))
        if self.cooldowns.failure(expert):
            record(Incident(expert=expert, kind="cooldown",
                            detail=f"{self.settings.cooldown_failures} failures in a row; skipped for {self.settings.cooldown_seconds:g} s"))
            return True
        return False

    def _run_expert(self, expert: str, requests: list[GenerationRequest], record) -> list[ExpertAnswer] | None:
        """The expert's answers, or None once its attempts are spent. A client error (a CoeError
        below 500, e.g. a prompt too long) is the request's fault: raised, never retried."""
        for attempt in range(1, self.settings.retries + 2):
            try:
                answers = self._call(requests)
            except CoeError as exc:
                if exc.status_code < 500:
                    raise
                if self._failed(expert, exc, attempt, record):
                    return None
                continue
            except Exception as exc:  # any other backend failure is the expert's failure here
                if self._failed(expert, exc, attempt, record):
                    return None
                continue
            self.cooldowns.success(expert)
            return answers
        return None

    # -- batches ---------------------------------------------------------------------------

    def generate(self, decisions: list[Decision], queries: dict[str, Query], experts: Collection[str] | None = None
                 ) -> tuple[dict[str, list[ExpertAnswer] | CoeError], dict[str, list[Incident]]]:
        """Answers per query id (in the order of each decision's chosen experts, after fallback),
        or the error of a query nothing could answer; and what happened, per query id. With
        `experts`, only the answers those chosen experts owe (one stage of a plan)."""
        slots = [_Slot(queries[d.query_id], d, i, s.expert) for d in decisions for i, s in enumerate(d.chosen)
                 if experts is None or s.expert in experts]
        incidents: dict[str, list[Incident]] = {slot.query.id: [] for slot in slots}
        errors: dict[str, CoeError] = {}
        answers: dict[int, ExpertAnswer] = {}
        pending = list(range(len(slots)))
        while pending:
            pending = [i for i in pending if self._skip_cooling(slots[i], slots, incidents, errors)]
            groups: dict[str, list[int]] = defaultdict(list)
            for i in pending:
                groups[slots[i].expert].append(i)
            if len(groups) > 1:  # one call for the whole mixed batch first: the common case costs nothing
                with contextlib.suppress(Exception):
                    out = self._call([slots[i].request() for i in pending])
                    answers.update(zip(pending, out))
                    for expert in groups:
                        self.cooldowns.success(expert)
                    break
            failed = []
            for expert, members in groups.items():
                ids = {slots[i].query.id for i in members}
                try:
                    out = self._run_expert(expert, [slots[i].request() for i in members],
                                           lambda inc, ids=ids: [incidents[q].append(inc) for q in ids])
                except CoeError:  # a bad request in the group: each alone, so only the bad ones fail
                    for i in members:
                        try:
                            alone = self._run_expert(expert, [slots[i].request()], incidents[slots[i].query.id].append)
                        except CoeError as exc:
                            errors[slots[i].query.id] = exc
                            continue
                        if alone is None:
                            failed.append(i)
                        else:
                            answers[i] = alone[0]
                    continue
                if out is None:
                    failed.extend(members)
                else:
                    answers.update(zip(members, out))
            pending = [i for i in failed if self._fall_back(slots[i], slots, incidents, errors)]
        by_query: dict[str, list[ExpertAnswer] | CoeError] = {}
        for i, slot in enumerate(slots):
            qid = slot.query.id
            if qid in errors:
                by_query[qid] = errors[qid]
            elif i in answers:
                by_query.setdefault(qid, []).append(answers[i])
        return by_query, incidents

    def _next_expert(self, slot: _Slot, slots: list[_Slot], skip_cooling: bool = True) -> str | None:
        if not self.settings.fallback:
            return None
        # Experts already answering this query, here or in another stage of the plan.
        busy = {s.expert for s in slots if s.query.id == slot.query.id and s is not slot}
        busy |= {s.expert for s in slot.decision.chosen} - {slot.expert}
        candidates = [s.expert for s in slot.decision.ranked if s.expert not in slot.tried and s.expert not in busy]
        if skip_cooling:
            candidates = [e for e in candidates if not self.cooldowns.cooling(e)]
        return candidates[0] if candidates else None

    def _fall_back(self, slot: _Slot, slots, incidents, errors) -> bool:
        """Move a failed slot to the next-ranked expert; False (and the query's error) when none is left."""
        slot.tried.append(slot.expert)
        qid = slot.query.id
        if qid in errors:
            return False
        following = self._next_expert(slot, slots)
        if following is None:
            errors[qid] = ExpertsFailedError(
                f"expert {slot.expert} failed and no other expert can answer this query",
                "retry later, or ask a routing policy (model coe) instead of one expert")
            return False
        incidents[qid].append(Incident(expert=following, kind="fallback", detail=f"answers instead of {slot.expert}"))
        slot.expert = following
        return True

    def _skip_cooling(self, slot: _Slot, slots, incidents, errors) -> bool:
        """Leave a cooling expert for the next-ranked one that is not; a slot whose every candidate
        is cooling keeps its expert (trying beats failing outright). False: the query already failed."""
        if slot.query.id in errors:
            return False
        if self.cooldowns.cooling(slot.expert):
            following = self._next_expert(slot, slots)
            if following is not None:
                incidents[slot.query.id].append(
                    Incident(expert=following, kind="fallback", detail=f"answers instead of {slot.expert}, which is cooling down"))
                slot.tried.append(slot.expert)
                slot.expert = following
        return True

    # -- one query as it arrives ----------------------------------------------------------

    async def _acall(self, request: GenerationRequest) -> ExpertAnswer:
        agenerate = getattr(self.backend, "agenerate", None)
        if agenerate is not None:
            call = agenerate(request)
        else:  # a batch-only backend: one request on a worker thread
            call = asyncio.get_running_loop().run_in_executor(self._workers, self.backend.generate, [request])
        try:
            answer = await asyncio.wait_for(call, self.settings.timeout_seconds)
        except asyncio.TimeoutError:
            raise ExpertTimeoutError(f"no answer within {self.settings.timeout_seconds:g} s") from None
        return answer if agenerate is not None else answer[0]

    async def agenerate(self, decision: Decision, query: Query) -> tuple[list[ExpertAnswer], list[Incident]]:
        """One query's answers (its chosen experts', after retries and fallback, in chosen order)
        and what happened; the slots run concurrently, each request as it arrives at the backend.
        Raises the query's error when a slot has no expert left (or the request is at fault)."""
        slots = [_Slot(query, decision, i, s.expert) for i, s in enumerate(decision.chosen)]
        incidents: dict[str, list[Incident]] = {query.id: []}
        errors: dict[str, CoeError] = {}
        record = incidents[query.id].append

        async def answer(slot: _Slot) -> ExpertAnswer | None:
            while True:
                if not self._skip_cooling(slot, slots, incidents, errors):
                    return None  # the query already failed in another slot
                for attempt in range(1, self.settings.retries + 2):
                    try:
                        result = await self._acall(slot.request())
                    except Exception as exc:
                        if isinstance(exc, CoeError) and exc.status_code < 500:
                            errors.setdefault(query.id, exc)  # the request's fault: no retry, no fallback
                            return None
                        if self._failed(slot.expert, exc, attempt, record):
                            break
                        continue
                    self.cooldowns.success(slot.expert)
                    return result
                if not self._fall_back(slot, slots, incidents, errors):
                    return None

        answers = await asyncio.gather(*(answer(slot) for slot in slots))
        if query.id in errors:
            raise errors[query.id]
        return list(answers), incidents[query.id]

    # -- aggregation -----------------------------------------------------------------------

    def aggregate(self, decision: Decision, answers: list[ExpertAnswer], incidents: list[Incident]) -> str:
        """The aggregator's answer; if it fails, the best-ranked expert's answer as it is."""
        try:
            return self._aggregate(decision, answers)
        except Exception as exc:
            incidents.append(Incident(expert=decision.aggregator, kind="aggregator_error",
                                      detail=f"{_one_line(exc)}; answered with {answers[0].expert}'s answer alone"))
            return answers[0].text

    # -- streams ---------------------------------------------------------------------------

    def stream(self, decision: Decision, query: Query) -> Iterator[StreamPiece | Incident]:
        """The best-ranked expert's answer as it is generated, with incidents as they happen;
        retries and fallbacks happen only before the first piece of text."""
        slot = _Slot(query, decision, 0, decision.ranked[0].expert)
        incidents: dict[str, list[Incident]] = {query.id: []}
        errors: dict[str, CoeError] = {}
        while True:
            self._skip_cooling(slot, [slot], incidents, errors)
            yield from _drain(incidents[query.id])
            for attempt in range(1, self.settings.retries + 2):
                started = False
                try:
                    with contextlib.closing(self.backend.stream(slot.request())) as pieces:
                        for piece in pieces:
                            started = started or bool(piece.text)
                            yield piece
                    self.cooldowns.success(slot.expert)
                    return
                except Exception as exc:
                    if isinstance(exc, CoeError) and exc.status_code < 500:
                        raise  # the request's fault: no retry, no fallback
                    if started:  # text reached the client: nothing to fall back to, the expert failed (503)
                        self.cooldowns.failure(slot.expert)
                        raise ExpertsFailedError(f"expert {slot.expert} failed mid-stream: {_one_line(exc)}",
                                                 "retry the request") from exc
                    cooling = self._failed(slot.expert, exc, attempt, incidents[query.id].append)
                    yield from _drain(incidents[query.id])
                    if cooling:
                        break
            if not self._fall_back(slot, [slot], incidents, errors):
                raise errors[query.id]
            yield from _drain(incidents[query.id])


def _drain(items: list) -> Iterator:
    while items:
        yield items.pop(0)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
