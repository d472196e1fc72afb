"""The pipeline: route -> plan -> execute -> aggregate, for one query or a batch.

The same code serves the CLI, the HTTP API and evaluation runs: a single request is a batch of one.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import nullcontext

from core.catalog import Catalog
from core.config import CoeConfig, ResilienceConfig
from core.errors import CoeError, WeightsMissingError, unknown
from core.types import Decision, ExpertAnswer, ExpertScore, Incident, PoolState, Query, Result, StreamPiece, StreamStart, Usage
from experts.backends import build_backend
from experts.backends.base import Backend
from experts.pool import Acquired
from experts.weights import residence, weights_available
from orchestrator import planner
from orchestrator.fallback import FallbackRunner
from orchestrator.faults import with_faults
from orchestrator.policies import build_policies
from routers import Router

VIRTUAL_PREFIX = "coe-"  # policies travel as virtual model names: coe-knn, ...


class Pipeline:
    def __init__(self, catalog: Catalog, backend: Backend, routers: dict[str, Router], default_policy: str,
                 resilience: ResilienceConfig | None = None, prefetch: bool = True):
        self.catalog = catalog
        self.prefetch = prefetch
        self.backend = backend
        self.fallback = FallbackRunner(backend, resilience)  # retries, fallback, cooldowns
        self.routers = routers
        self.default_policy = default_policy
        self.available = {e.name for e in catalog.experts if weights_available(catalog, e)}
        if catalog.default_expert not in self.available:
            tier, detail = residence(catalog, catalog.get(catalog.default_expert))
            raise WeightsMissingError(f"the default expert {catalog.default_expert!r} cannot run: weights {tier}", detail)

    @classmethod
    def from_config(cls, config: CoeConfig, backend: Backend | None = None) -> Pipeline:
        catalog = config.load_catalog()
        backend = backend or build_backend(config.backend.name, catalog, pool=config.pool, **config.backend.options)
        routers = build_policies(config.policies, catalog)
        return cls(catalog, with_faults(backend, config.faults), routers, config.default_policy, config.resilience,
                   prefetch=config.pool.prefetch)

    # -- routing ---------------------------------------------------------------------------

    @property
    def policies(self) -> list[str]:
        return sorted(self.routers)

    def resolve_policy(self, policy: str | None) -> str:
        """A router policy or a concrete expert; `coe` alone and `coe-<policy>` are accepted too."""
        name = policy or self.default_policy
        if name == "coe":
            name = self.default_policy
        elif name.startswith(VIRTUAL_PREFIX) and name[len(VIRTUAL_PREFIX):] in self.routers:
            name = name[len(VIRTUAL_PREFIX):]
        if name in self.routers:
            return name
        if name in self.catalog.names:
            if name not in self.available:
                raise WeightsMissingError(f"expert {name!r} is in the catalog but its weights are not installed",
                                          "see `coe experts list`")
            return name
        raise unknown("policy or expert", name, [*self.routers, *(VIRTUAL_PREFIX + p for p in self.routers), *self.available])

    def route(self, queries: list[Query]) -> list[Decision]:
        by_policy: dict[str, list[Query]] = defaultdict(list)
        for query in queries:
            by_policy[self.resolve_policy(query.policy)].append(query)
        decisions: dict[str, Decision] = {}
        for policy, members in by_policy.items():
            if policy in self.routers:
                routed = self.routers[policy].route([q.text for q in members], [q.id for q in members], policy)
                decisions.update({d.query_id: self._only_available(d) for d in routed})
            else:
                for q in members:
                    decisions[q.id] = Decision(query_id=q.id, policy=policy, ranked=[ExpertScore(expert=policy, score=1.0)],
                                               explanation=f"expert {policy} requested by name")
        return [decisions[q.id] for q in queries]

    def _only_available(self, decision: Decision) -> Decision:
        ranked = [s for s in decision.ranked if s.expert in self.available]
        dropped = [s.expert for s in decision.chosen if s.expert not in self.available]
        explanation = decision.explanation
        if dropped:
            explanation += f"; {', '.join(dropped)} unavailable (weights missing), next-ranked expert answers"
        return decision.model_copy(update={"ranked": ranked, "k": min(decision.k, len(ranked)), "explanation": explanation})

    # -- execution -------------------------------------------------------------------------

    def run(self, queries: list[Query], return_errors: bool = False) -> list[Result | CoeError]:
        """Route, plan, then run the plan stage by stage (the experts of one base in one call),
        loading the next stage's experts in the background while the current one computes. Each
        stage goes through the fallback runner (retries, next-ranked fallback, cooldowns). A query
        that no expert could answer raises its error, or with `return_errors` takes the error's
        place in the list (the rest of the batch is answered)."""
        started = time.perf_counter()
        decisions = self.route(queries)
        routed = time.perf_counter()
        pool = getattr(self.backend, "pool", None)
        state = pool.state() if pool is not None else PoolState(residence=self.backend.resident())
        batch_plan = planner.plan(decisions, state)
        planned = time.perf_counter()

        by_id = {q.id: q for q in queries}
        answers: dict[str, list[ExpertAnswer]] = {d.query_id: [] for d in decisions}
        errors: dict[str, CoeError] = {}
        incidents: dict[str, list[Incident]] = {d.query_id: [] for d in decisions}
        waited = moved = generate_seconds = 0.0
        prefetches: list[Future] = []
        stages = batch_plan.stages()
        with pool.announce(batch_plan.order) if pool is not None else nullcontext():
            for i, stage in enumerate(stages):
                experts = [g.expert for g in stage]
                if pool is not None and self.prefetch and i + 1 < len(stages):
                    prefetches.append(pool.prefetch([g.expert for g in stages[i + 1]]))
                with pool.pinned(experts) if pool is not None else nullcontext() as acquired:
                    if acquired is None:  # a backend without a pool loads on its own
                        acquired = Acquired(moved=sum(self.fallback.load(e) for e in experts))
                        acquired.waited = acquired.moved
                    waited += acquired.waited
                    moved += acquired.moved
                    generating = time.perf_counter()
                    outcomes, happened = self.fallback.generate(decisions, by_id, experts=set(experts))
                    generate_seconds += time.perf_counter() - generating
                for qid, outcome in outcomes.items():
                    if isinstance(outcome, CoeError):
                        errors[qid] = outcome
                    else:
                        answers[qid] += outcome
                for qid, items in happened.items():
                    incidents[qid] += items
        prefetched = sum(f.result() for f in prefetches if f.done() and f.exception() is None)
        generated_at = time.perf_counter()

        for d in decisions:  # stages run in plan order; each query's answers go back to rank order
            rank = {s.expert: r for r, s in enumerate(d.ranked)}
            answers[d.query_id].sort(key=lambda a: rank.get(a.expert, len(rank)))
        texts = {d.query_id: self.fallback.aggregate(d, answers[d.query_id], incidents[d.query_id])
                 for d in decisions if d.query_id not in errors}
        finished = time.perf_counter()
        transfer = moved + prefetched
        timings = {
            "route": routed - started, "plan": planned - routed,
            "load": waited,  # seconds the batch waited for experts to reach the device
            "load_transfer": transfer,  # seconds of tier moves for this batch, prefetched ones included
            "load_hidden": max(0.0, transfer - waited),  # of which overlapped with computation
            "loads": float(batch_plan.loads),
            "generate": generate_seconds, "aggregate": finished - generated_at, "total": finished - started,
        }
        results: list[Result | CoeError] = []
        for d in decisions:
            if d.query_id in errors:
                if not return_errors:
                    raise errors[d.query_id]
                results.append(errors[d.query_id])
            else:
                results.append(self._result(d, answers[d.query_id], texts[d.query_id], timings, incidents[d.query_id]))
        return results

    def stream(self, query: Query) -> Iterator[StreamStart | StreamPiece | Incident | Result]:
        """Route and load, then yield a StreamStart (the Decision), the answer's text as it is
        generated (StreamPieces, with Incidents as they happen) and the Result last. Aggregating
        k > 1 answers needs all of them first: the aggregated text then comes as one piece."""
        started = time.perf_counter()
        [decision] = self.route([query])
        if decision.k > 1:
            [result] = self.run([query])
            yield StreamStart(decision=decision, load_seconds=result.timings["load"])
            yield from result.incidents
            yield StreamPiece(text=result.text)
            yield result
            return
        load_seconds = self.fallback.load(decision.ranked[0].expert)
        yield StreamStart(decision=decision, load_seconds=load_seconds)
        generating = time.perf_counter()
        incidents: list[Incident] = []
        answer = None
        for event in self.fallback.stream(decision, query):
            if isinstance(event, Incident):
                incidents.append(event)
            elif event.answer is not None:
                answer = event.answer
                continue
            yield event
        finished = time.perf_counter()
        timings = {"route": generating - started - load_seconds, "load": load_seconds,
                   "generate": finished - generating, "total": finished - started}
        yield self._result(decision, [answer], answer.text, timings, incidents)

    async def arun(self, query: Query) -> Result:
        """One query as it arrives (a server's request): route, load its experts, then its expert
        calls go through the fallback runner (retries, fallback, cooldowns, as `run`) to the
        backend's `agenerate`, so concurrent queries share the backend's batches (vLLM: the
        engine's steps; transformers: the next micro-batch). Cancelling the call stops its generation."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        [decision] = await loop.run_in_executor(None, self.route, [query])
        routed = time.perf_counter()
        load_seconds = 0.0
        for choice in decision.chosen:
            load_seconds += await loop.run_in_executor(None, self.fallback.load, choice.expert)
        loaded = time.perf_counter()
        answers, incidents = await self.fallback.agenerate(decision, query)
        generated_at = time.perf_counter()
        text = self.fallback.aggregate(decision, answers, incidents)
        finished = time.perf_counter()
        timings = {"route": routed - started, "plan": 0.0, "load": load_seconds, "generate": generated_at - loaded,
                   "aggregate": finished - generated_at, "total": finished - started}
        return self._result(decision, answers, text, timings, incidents)

    @staticmethod
    def _result(decision: Decision, answers: list[ExpertAnswer], text: str, timings: dict[str, float],
                incidents: list[Incident] = ()) -> Result:
        usage = Usage(prompt_tokens=sum(a.prompt_tokens for a in answers),
                      completion_tokens=sum(a.completion_tokens for a in answers))
        finish = next((a.finish_reason for a in answers if a.text == text), answers[0].finish_reason)
        return Result(query_id=decision.query_id, text=text, decision=decision, answers=answers,
                      usage=usage, finish_reason=finish, timings=timings, incidents=list(incidents))

    @staticmethod
    def describe(result: Result) -> dict:
        """The JSON a person or a client reads: answer, experts with scores, timings."""
        chosen = {s.expert for s in result.decision.chosen}
        return {
            "answer": result.text,
            "policy": result.decision.policy,
            "experts": [{"name": s.expert, "score": s.score, "chosen": s.expert in chosen} for s in result.decision.ranked],
            "aggregator": result.decision.aggregator,
            "explanation": result.decision.explanation,
            "answered_by": result.experts,
            "fallback": result.fell_back,
            "incidents": [i.model_dump() for i in result.incidents],
            "usage": {**result.usage.model_dump(), "total_tokens": result.usage.total_tokens},
            "finish_reason": result.finish_reason,
            "timings": {k: round(v, 4) for k, v in result.timings.items()},
        }
