"""The engine: route -> plan -> the pool executes the plan stage by stage -> aggregate -> Result.

One loop for every request: a batch (`run`, `arun`), a single call (a batch of one) and a stream
(`astream`: the same loop, with the text of the answer's final slot sent on as it is generated).
vLLM v1's scheduler/executor split is the shape: the planner (orchestrator/planner.py) decides
what runs in which order, the pool and the backend execute, and each round's answers are folded
back into every query's progress, which may ask for more work: the next expert of a cascade, or
an aggregator's synthesis. Retries and fallback are the SlotRunner's (orchestrator/fallback.py).

The loop runs on the engine's own event loop thread: synchronous callers (`run`: the CLI,
evaluation runs) and async callers on other loops (`arun`, `astream`: a Serve replica, the HTTP
app) feed the same loop, so concurrent requests share the backends' batches. Cancelling an async
caller cancels its work.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field

from core import tracing
from core.catalog import Catalog
from core.config import CoeConfig, ResilienceConfig, SessionConfig
from core.costs import request_cost
from core.errors import CoeError, PromptTooLongError, UnsupportedFieldError, WeightsMissingError, unknown
from core.loops import relay
from core.types import (
    Capabilities,
    Decision,
    ExpertAnswer,
    ExpertScore,
    Incident,
    PoolState,
    Query,
    Result,
    Shadow,
    StreamPiece,
    StreamStart,
    Usage,
)
from experts.backends import build_backend
from experts.backends.base import Backend
from experts.weights import context_length, residence, weights_available
from orchestrator import aggregators, planner
from orchestrator.fallback import Slot, SlotRunner, one_line
from orchestrator.faults import with_faults
from orchestrator.policies import VIRTUAL_PREFIX, build_policies, policy_name
from orchestrator.sessions import Sessions, SessionStore, keep_session_expert
from routers import Router

# Seconds per stage of a batch (`loads` counts experts brought to the device): `load` is the time
# the batch waited for experts, `load_transfer` the moves done for it (prefetched ones included),
# `load_hidden` the part of those overlapped with computation.
TIMINGS = ("route", "plan", "load", "load_transfer", "load_hidden", "loads", "generate", "aggregate", "total")


def split_cost_knob(model: str) -> tuple[str, float | None]:
    """`coe-knn@0.3` -> ("coe-knn", 0.3); a name without `@` has no knob."""
    name, at, knob = model.rpartition("@")
    if not at:
        return model, None
    try:
        value = float(knob)
    except ValueError:
        raise CoeError(f"model {model!r}: the cost knob after @ must be a number in [0, 1]", "e.g. coe-knn@0.3") from None
    if not 0.0 <= value <= 1.0:
        raise CoeError(f"model {model!r}: the cost knob {value:g} is outside [0, 1]", "e.g. coe-knn@0.3")
    return name, value


def shadow_of(decision: Decision, candidate: Decision) -> Shadow:
    chosen = [s.expert for s in candidate.chosen]
    return Shadow(policy=candidate.policy, chosen=chosen, agrees=set(chosen) == {s.expert for s in decision.chosen})


def estimated_tokens(query: Query) -> int:
    """Prompt tokens (about 4 characters each, rounded up, plus a few per message) and max_tokens:
    enough to leave out an expert whose context is clearly too short; the backend checks exactly."""
    return sum(-(-len(m.content) // 4) + 4 for m in query.messages) + query.params.max_tokens


def cost_threshold(query: Query) -> float | None:
    """The request's cost knob: the body's `coe.cost_threshold`, else the model name's `@`."""
    if query.cost_threshold is not None:
        return query.cost_threshold
    return split_cost_knob(query.policy)[1] if query.policy else None


@dataclass(eq=False)
class _Progress:
    """One query on its way through the loop."""

    query: Query
    decision: Decision
    stream: bool  # the caller wants the final answer's text as it is generated
    slots: list[Slot] = field(default_factory=list)
    answers: list[ExpertAnswer] = field(default_factory=list)
    aggregated: ExpertAnswer | None = None  # a synthesis written by the aggregator expert
    incidents: list[Incident] = field(default_factory=list)
    error: CoeError | None = None
    started: bool = False  # StreamStart sent
    text: str | None = None  # the final answer, once known

    def slot(self, expert: str, emit: bool = False, **extra) -> Slot:
        slot = Slot(self.query, self.decision, expert, emit=emit, siblings=self.slots, **extra)
        self.slots.append(slot)
        return slot

    @property
    def single(self) -> bool:
        """One expert answers and its answer is the final one (its text can stream as it comes)."""
        return self.decision.k == 1 and self.decision.cascade is None


class _Sink:
    """Where the loop's events go: StreamStart and text for streamed queries (the final Result or
    error is the loop's return value)."""

    async def start(self, progress: _Progress, load_seconds: float) -> None: ...

    async def text(self, progress: _Progress, text: str) -> None: ...


class _QueueSink(_Sink):
    def __init__(self, put: Callable[[object], None]):
        self.put = put

    async def start(self, progress: _Progress, load_seconds: float) -> None:
        self.put(StreamStart(decision=progress.decision, load_seconds=load_seconds))

    async def text(self, progress: _Progress, text: str) -> None:
        self.put(StreamPiece(text=text))


class Pipeline:
    def __init__(self, catalog: Catalog, backend: Backend, routers: dict[str, Router], default_policy: str,
                 resilience: ResilienceConfig | None = None, prefetch: bool = True, sessions: SessionStore | None = None,
                 session_margin: float = SessionConfig().margin, shadows: dict[str, str] | None = None):
        """`sessions`: where conversations remember their expert (default: this process's memory);
        `shadows`: policy -> the policy that decides alongside it without answering."""
        self.catalog = catalog
        self.sessions = sessions if sessions is not None else Sessions()
        self.session_margin = session_margin
        self.shadows = dict(shadows or {})
        self.prefetch = prefetch
        self.backend = backend
        self.runner = SlotRunner(backend, resilience)  # retries, fallback, cooldowns
        self.routers = routers
        self.default_policy = default_policy
        self.available = {e.name for e in catalog.experts if weights_available(catalog, e)}
        self._parents = {e.name: e.base for e in catalog.experts if e.kind == "lora"}  # LoRA experts of a base run together
        self._context: dict[str, int] = {}
        self._capabilities: dict[str, Capabilities] = {}
        if catalog.default_expert not in self.available:
            tier, detail = residence(catalog, catalog.get(catalog.default_expert))
            raise WeightsMissingError(f"the default expert {catalog.default_expert!r} cannot run: weights {tier}", detail)
        # Routing (embedding) and waiting for pool memory block: they run on threads of their own.
        self._threads = ThreadPoolExecutor(max_workers=32, thread_name_prefix="coe-engine")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coe-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: CoeConfig, backend: Backend | None = None, sessions: SessionStore | None = None) -> Pipeline:
        catalog = config.load_catalog()
        backend = backend or build_backend(config.backend.name, catalog, pool=config.pool, **config.backend.options)
        routers = build_policies(config.policies, catalog)
        shadows = {name: policy.shadow for name, policy in config.policies.items() if policy.shadow}
        pipeline = cls(catalog, with_faults(backend, config.faults), routers, config.default_policy, config.resilience,
                       prefetch=config.pool.prefetch, sessions=sessions or Sessions(config.sessions),
                       session_margin=config.sessions.margin, shadows=shadows)
        pipeline.config = config
        return pipeline

    config: CoeConfig | None = None  # where from_config built it from: what `reload` reads again

    def reload(self) -> dict:
        """Read the catalog and the policies' routers again (a changed catalog file, router folder
        or routing examples) and swap them in between batches: a batch routes once, so requests in
        flight finish with the routing they started with. The backend stays: an expert it does not
        run (a new model) waits for a restart, which the reply names."""
        if self.config is None:
            raise CoeError("this engine was not built from a config, so there is nothing to read again")
        catalog = self.config.load_catalog()
        routers = build_policies(self.config.policies, catalog)
        runnable = self._runnable()
        available = {e.name for e in catalog.experts if weights_available(catalog, e) and e.name in runnable}
        before = set(self.available)
        self.catalog, self.routers, self.available, self._context = catalog, routers, available, {}
        self._parents = {e.name: e.base for e in catalog.experts if e.kind == "lora"}
        waiting = sorted({e.name for e in catalog.experts} - runnable)
        return {"policies": self.policies, "experts": sorted(available), "added": sorted(available - before),
                "removed": sorted(before - available), "restart_needed_for": waiting}

    def _runnable(self) -> set[str]:
        """The experts the backend runs (a composite says; another backend runs its catalog's)."""
        experts = getattr(self.backend, "experts", None)
        return set(experts) if experts is not None else {e.name for e in self.catalog.experts}

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the engine loop and its tasks (the backend is its owner's to shut down)."""

        async def cancel_everything() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            self._on_loop(cancel_everything()).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._threads.shutdown(wait=False)

    # -- routing ---------------------------------------------------------------------------

    @property
    def policies(self) -> list[str]:
        return sorted(self.routers)

    def resolve_policy(self, policy: str | None) -> str:
        """A router policy or a concrete expert; `coe` alone and `coe-<policy>` are accepted too,
        and a router policy may carry the cost knob: `coe-knn@0.3`."""
        name, threshold = split_cost_knob(policy or self.default_policy)
        routed = policy_name(name, self.routers, self.default_policy)
        if routed is not None:
            return routed
        if threshold is not None:
            raise CoeError(f"model {policy!r}: the cost knob @{threshold:g} applies to routing policies only",
                           f"drop the @ part or ask a policy: {', '.join(VIRTUAL_PREFIX + p for p in self.routers)}")
        if name in self.catalog.names:
            if name not in self.available:
                raise WeightsMissingError(f"expert {name!r} is in the catalog but its weights are not installed",
                                          "see `coe experts list`")
            return name
        raise unknown("policy or expert", name, [*self.routers, *(VIRTUAL_PREFIX + p for p in self.routers), *self.available])

    def route(self, queries: list[Query]) -> list[Decision]:
        by_policy: dict[tuple[str, float | None], list[Query]] = defaultdict(list)
        for query in queries:
            by_policy[self.resolve_policy(query.policy), cost_threshold(query)].append(query)
        decisions: dict[str, Decision] = {}
        for (policy, threshold), members in by_policy.items():
            if policy in self.routers:
                texts, ids = [q.text for q in members], [q.id for q in members]
                router = self.routers[policy]
                routed = router.route(texts, ids, policy, cost_threshold=threshold, history=[q.history for q in members],
                                      load_seconds=self._load_seconds(router))
                routed = self._keep_sessions(members, [self._eligible(q, d) for q, d in zip(members, routed)])
                if policy in self.shadows:
                    shadow = self.shadows[policy]
                    candidates = self.routers[shadow].route(texts, ids, shadow, cost_threshold=threshold)
                    routed = [d.model_copy(update={"shadow": shadow_of(d, c)}) for d, c in zip(routed, candidates)]
                decisions.update({d.query_id: d for d in routed})
            else:
                for q in members:
                    decisions[q.id] = self._eligible(q, Decision(
                        query_id=q.id, policy=policy, ranked=[ExpertScore(expert=policy, score=1.0)],
                        explanation=f"expert {policy} requested by name"))
        return [decisions[q.id] for q in queries]

    def _load_seconds(self, router: Router):
        """Seconds each of the router's experts would take to reach the device now, for a router
        that weighs loads (`load_penalty`); None otherwise or without a pool to ask."""
        pool = getattr(self.backend, "pool", None)
        if getattr(router, "load_penalty", 0.0) <= 0 or pool is None:
            return None
        seconds = pool.seconds_to_device([e for e in router.experts if e in pool])
        return [seconds.get(e, 0.0) for e in router.experts]

    def _keep_sessions(self, queries: list[Query], decisions: list[Decision]) -> list[Decision]:
        """Conversations stay with the expert that answered their last turn, within the margin."""
        known = self.sessions.get([q.session for q in queries if q.session]) if any(q.session for q in queries) else {}
        return [keep_session_expert(d, known[q.session], self.session_margin) if q.session in known else d
                for q, d in zip(queries, decisions)]

    def _eligible(self, query: Query, decision: Decision) -> Decision:
        """The decision among the experts that can answer this query: weights available, the
        capabilities its fields need (tools, response_format, logprobs, n > 1: `capabilities`),
        and a context that holds the prompt and `max_tokens`. When none of the decision's experts
        can, a CoeError 400 names the field no expert supports, or says the context limit. A
        request that needs a capability or sends a raw prompt is one expert's answer (k = 1)."""
        need = estimated_tokens(query)
        needs = query.params.needs()
        ranked, dropped, short, incapable = [], [], [], {}
        for s in decision.ranked:
            if s.expert not in self.available or not self._fits(s.expert):
                dropped.append(s.expert)
            elif needs and (lacks := self.capabilities(s.expert).lacks(needs)):
                incapable[s.expert] = lacks
            elif self.context_length(s.expert) < need:
                short.append(s.expert)
            else:
                ranked.append(s)
        if not ranked:
            if incapable and not short:
                field = next((f for f in needs if all(f in lacks for lacks in incapable.values())), needs[0])
                named = decision.policy not in self.routers
                raise UnsupportedFieldError(
                    f"expert {decision.policy} does not support `{field}`" if named
                    else f"no expert of policy {decision.policy} supports `{field}`", field,
                    "send the request without it, or to a model that has it (GET /v1/models shows each expert's capabilities)")
            longest = max((self.context_length(e) for e in short), default=0)
            raise PromptTooLongError(f"the request needs about {need} tokens of context (prompt and max_tokens); "
                                     f"the experts of policy {decision.policy} take at most {longest}",
                                     "shorten the messages or lower max_tokens")
        explanation = decision.explanation
        chosen = {s.expert for s in decision.chosen}
        if chosen & set(dropped):
            explanation += (f"; {', '.join(e for e in dropped if e in chosen)} unavailable (weights missing, or larger "
                            f"than the device budget)")
        if chosen & set(incapable):
            explanation += "; " + ", ".join(f"{e} lacks {'/'.join(incapable[e])}" for e in incapable if e in chosen)
        if chosen & set(short):
            explanation += f"; {', '.join(e for e in short if e in chosen)} too short a context for about {need} tokens"
        if explanation != decision.explanation:
            explanation += ", next-ranked expert answers"
        update: dict = {"ranked": ranked, "k": min(decision.k, len(ranked)), "explanation": explanation}
        if query.params.single_expert and (decision.k > 1 or decision.cascade is not None):
            update.update(k=1, cascade=None, aggregator="passthrough",
                          explanation=explanation + f"; one expert answers ({', '.join(needs) or 'raw prompt'})")
        return decision.model_copy(update=update)

    def capabilities(self, expert: str) -> Capabilities:
        """What the expert can do beyond plain text, as its backend says (experts/capabilities.py);
        a backend that says nothing offers plain text only."""
        if expert not in self._capabilities:
            ask = getattr(self.backend, "capabilities", None)
            self._capabilities[expert] = ask(expert) if ask is not None else Capabilities()
        return self._capabilities[expert]

    def _fits(self, expert: str) -> bool:
        """An expert larger than the whole device budget can never run here."""
        pool = getattr(self.backend, "pool", None)
        return pool is None or expert not in pool or pool.fits(expert)

    def context_length(self, expert: str) -> int:
        """Tokens of prompt plus answer the expert takes (read once: it may come from its model's files)."""
        if expert not in self._context:
            length = getattr(self.backend, "context_length", None)
            self._context[expert] = length(expert) if length is not None else context_length(self.catalog, self.catalog.get(expert))
        return self._context[expert]

    # -- entry points ----------------------------------------------------------------------

    def run(self, queries: list[Query], return_errors: bool = False) -> list[Result | CoeError]:
        """Answer a batch from a plain thread. A query that no expert could answer raises its
        error, or with `return_errors` takes the error's place in the list (the rest of the
        batch is answered)."""
        return self._on_loop(self._answer(queries, return_errors)).result()

    async def arun(self, queries: list[Query], return_errors: bool = False) -> list[Result | CoeError]:
        """`run` for an async caller on any event loop; cancelling the caller cancels the work."""
        return await asyncio.wrap_future(self._on_loop(self._answer(queries, return_errors)))

    async def astream(self, query: Query) -> AsyncIterator[StreamStart | StreamPiece | Result]:
        """One query: a StreamStart (the Decision, once its experts are loaded), the answer's text
        as it is generated (StreamPieces), then the Result; a failure raises its CoeError (before
        or after text was sent). Aggregating k > 1 answers needs all of them first: a vote's
        answer then comes as one piece, a synthesis streams as the aggregator writes it."""

        async def produce(put) -> None:
            try:
                [outcome] = await self._execute([query], _QueueSink(put), stream={query.id})
                put(outcome)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, cancellation included
                put(exc)

        async with aclosing(relay(produce, self._loop, last=lambda event: isinstance(event, Result))) as events:
            async for event in events:  # closing this stream closes the relay, which cancels the work at once
                yield event

    def _on_loop(self, coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _answer(self, queries: list[Query], return_errors: bool) -> list[Result | CoeError]:
        outcomes = await self._execute(queries, _Sink(), stream=set())
        if not return_errors:
            for outcome in outcomes:
                if isinstance(outcome, CoeError):
                    raise outcome
        return outcomes

    # -- the loop ----------------------------------------------------------------------------

    async def _execute(self, queries: list[Query], sink: _Sink, stream: set[str]) -> list[Result | CoeError]:
        """Route, then rounds of plan -> stages -> fold until every query has its answer."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        with tracing.span("route", carrier=queries[0].trace, batch=len(queries)):
            decisions = await loop.run_in_executor(self._threads, self.route, queries)
        timings = defaultdict(float, dict.fromkeys(TIMINGS, 0.0), route=time.perf_counter() - started)
        progress = [_Progress(q, d, q.id in stream) for q, d in zip(queries, decisions)]
        pending: list[Slot] = []
        for p in progress:
            first = p.decision.chosen[:1] if p.decision.cascade is not None else p.decision.chosen
            pending += [p.slot(s.expert, emit=p.stream and p.single) for s in first]
        of_slot = {id(s): p for p in progress for s in p.slots}
        while pending:
            await self._round(pending, of_slot, sink, timings)
            pending = []
            for p in progress:
                if p.error is None and p.text is None:
                    pending += self._fold(p, timings)
            of_slot = {id(s): p for p in progress for s in p.slots}
        for p in progress:
            if p.error is None and p.stream and p.aggregated is None and not p.single:
                await sink.text(p, p.text)  # a vote or a cascade: the answer in one piece
        timings["total"] = time.perf_counter() - started
        answered = {p.query.session: p.answers[0].expert for p in progress
                    if p.query.session and p.error is None and p.decision.policy in self.routers}
        if answered:
            self.sessions.put(answered)
        return [p.error if p.error is not None else self._result(p, dict(timings), len(queries)) for p in progress]

    async def _round(self, slots: list[Slot], of_slot: dict[int, _Progress], sink: _Sink, timings: dict) -> None:
        """Plan the round's slots and run them stage by stage (the experts of one base together),
        loading the next stage's experts in the background while the current one computes."""
        planning = time.perf_counter()
        pool = self.backend.pool
        state = pool.state() if pool is not None else PoolState(residence=self.backend.resident(), parents=self._parents)
        plan = planner.plan_work([(s.query.id, s.expert) for s in slots], state)
        timings["plan"] += time.perf_counter() - planning
        timings["loads"] += plan.loads
        by_expert: dict[str, list[Slot]] = defaultdict(list)
        for slot in slots:
            by_expert[slot.expert].append(slot)
        stages = plan.stages()
        prefetches: list[Future] = []
        announcement = pool.announce(plan.order) if pool is not None else None
        try:
            for i, stage in enumerate(stages):
                experts = [g.expert for g in stage]
                if pool is not None and self.prefetch and i + 1 < len(stages):
                    prefetches.append(pool.prefetch([g.expert for g in stages[i + 1]]))
                waited, moved, release = await self._acquire(experts)
                timings["load"] += waited
                timings["load_transfer"] += moved
                generating = time.perf_counter()
                try:
                    members = [s for e in experts for s in by_expert[e]]
                    await asyncio.gather(*(self._run_slot(s, of_slot[id(s)], sink, waited) for s in members))
                finally:
                    release()
                timings["generate"] += time.perf_counter() - generating
        finally:
            if announcement is not None:
                announcement.withdraw()
        prefetched = sum(f.result() for f in prefetches if f.done() and f.exception() is None)
        timings["load_transfer"] += prefetched
        timings["load_hidden"] = max(0.0, timings["load_transfer"] - timings["load"])

    async def _acquire(self, experts: list[str]) -> tuple[float, float, Callable[[], None]]:
        """The stage's experts on the device: (seconds waited, seconds of moves, release). A
        backend without a pool loads on its own; a failing load is left to the slot's retries."""
        loop = asyncio.get_running_loop()
        pool = self.backend.pool
        if pool is not None:
            try:
                acquired = await loop.run_in_executor(self._threads, pool.pin, experts)
            except CoeError:  # no room now (others hold it too long): each slot's own attempt fails or falls back
                return 0.0, 0.0, lambda: None
            return acquired.waited, acquired.moved, acquired.release
        seconds = 0.0
        for expert in experts:
            try:
                seconds += await loop.run_in_executor(self._threads, self.backend.load, expert)
            except Exception:  # noqa: BLE001 - the slot's attempts will meet the failure and fall back
                pass
        return seconds, seconds, lambda: None

    async def _run_slot(self, slot: Slot, p: _Progress, sink: _Sink, load_seconds: float) -> None:
        if p.error is not None:
            return  # another slot of the query already failed it
        if p.stream:
            await self._started(p, sink, load_seconds)
        try:
            answer = await self.runner.answer(slot, p.incidents.append, lambda text: sink.text(p, text))
        except CoeError as exc:
            if slot.fallback:
                p.error = exc
            else:  # the aggregator failed: the best-ranked single answer stands
                p.incidents.append(Incident(expert=slot.expert, kind="aggregator_error",
                                            detail=f"{one_line(exc)}; answered with {p.answers[0].expert}'s answer alone"))
                p.text = p.answers[0].text
            return
        answer = answer.model_copy(update={"cost": request_cost(self.catalog.get(answer.expert), answer.prompt_tokens,
                                                                 answer.completion_tokens)})
        if slot.fallback:
            p.answers.append(answer)
        else:
            p.aggregated = answer
            p.text = answer.text

    async def _started(self, p: _Progress, sink: _Sink, load_seconds: float) -> None:
        if not p.started:
            p.started = True
            await sink.start(p, load_seconds)

    def _fold(self, p: _Progress, timings: dict) -> list[Slot]:
        """After a round: the query's next slots (a cascade's next expert, the aggregator's
        synthesis), or its final text."""
        d = p.decision
        rank = {s.expert: r for r, s in enumerate(d.ranked)}
        p.answers.sort(key=lambda a: rank.get(a.expert, len(rank)))  # stages ran in plan order
        if d.cascade is not None and len(p.answers) < d.k:
            score = {s.expert: s.score for s in d.ranked}
            if max(score.get(a.expert, 0.0) for a in p.answers) < d.cascade:
                used = {s.expert for s in p.slots}
                following = next((s.expert for s in d.ranked if s.expert not in used), None)
                if following is not None:
                    return [p.slot(following)]
        if len(p.answers) == 1:  # one answer is its own aggregate: no aggregation stage
            p.text = p.answers[0].text
            return []
        if aggregators.generates(d.aggregator):
            writer = d.aggregator_expert or p.answers[0].expert
            messages = aggregators.synthesis_messages(p.query, p.answers)
            return [p.slot(writer, emit=p.stream, messages=messages, fallback=False)]
        aggregating = time.perf_counter()
        try:
            p.text = aggregators.aggregate(d, p.answers)
        except Exception as exc:  # noqa: BLE001 - a failing aggregator leaves the best single answer
            p.incidents.append(Incident(expert=d.aggregator, kind="aggregator_error",
                                        detail=f"{one_line(exc)}; answered with {p.answers[0].expert}'s answer alone"))
            p.text = p.answers[0].text
        timings["aggregate"] += time.perf_counter() - aggregating
        return []

    @staticmethod
    def _result(p: _Progress, timings: dict[str, float], batch_size: int) -> Result:
        answers = p.answers
        counted = answers + ([p.aggregated] if p.aggregated is not None else [])
        usage = Usage(prompt_tokens=sum(a.prompt_tokens for a in counted),
                      completion_tokens=sum(a.completion_tokens for a in counted))
        final = p.aggregated or next((a for a in answers if a.text == p.text), answers[0])
        return Result(query_id=p.query.id, text=p.text, decision=p.decision, answers=answers, usage=usage,
                      finish_reason=final.finish_reason, tool_calls=final.tool_calls, logprobs=final.logprobs,
                      more_choices=final.more_choices, timings=timings, incidents=p.incidents,
                      aggregator_answer=p.aggregated, batch_size=batch_size)
