"""The pipeline: route -> plan -> execute -> aggregate, for one query or a batch.

The same code serves the CLI, the HTTP API and evaluation runs: a single request is a batch of one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import defaultdict

from experts.backends import build_backend
from experts.backends.base import Backend, GenerationRequest
from experts.catalog import Catalog
from experts.weights import cache_dir, residence, weights_available
from orchestrator import planner
from orchestrator.aggregators import aggregate
from orchestrator.config import CoeConfig, PolicyConfig
from orchestrator.errors import WeightsMissingError, unknown
from orchestrator.types import Decision, ExpertAnswer, ExpertScore, Query, Result, Usage
from routers import Router, build_router
from routers.base import EmbeddingRouter

VIRTUAL_PREFIX = "coe-"  # policies travel as virtual model names: coe-knn, ...
ROUTER_STATE_FORMAT = 3  # part of the fitted-router cache key: bump when saved router state changes


def fit_policy(name: str, policy: PolicyConfig, catalog: Catalog) -> Router:
    """Fit a policy's router on the catalog's experts; the fitted router is cached on disk."""
    from evals.tasks import expert_examples

    options = {"fallback_expert": catalog.default_expert, **policy.options}
    data = expert_examples(catalog, policy.examples_per_expert, policy.default_expert_examples)
    key_source = json.dumps(
        {"policy": policy.model_dump(), "options": options, "experts": data.experts, "texts": data.texts,
         "labels": data.outcomes.argmax(axis=1).tolist(), "format": ROUTER_STATE_FORMAT},
        sort_keys=True, default=str,
    )
    directory = cache_dir() / "routers" / f"{name}-{hashlib.sha256(key_source.encode()).hexdigest()[:16]}"
    router = build_router(policy.router, **options)
    if (directory / "router.json").is_file():
        return type(router).load(directory, **options)
    embeddings = None
    if isinstance(router, EmbeddingRouter):
        from routers.embedder import shared_embedder

        embeddings = shared_embedder().embed_cached(data.texts)  # embedded once for every policy
    router.fit(data, embeddings)
    router.save(directory)
    return router


class Pipeline:
    def __init__(self, catalog: Catalog, backend: Backend, routers: dict[str, Router], default_policy: str):
        self.catalog = catalog
        self.backend = backend
        self.routers = routers
        self.default_policy = default_policy
        self.available = {e.name for e in catalog.experts if weights_available(catalog, e)}
        if catalog.default_expert not in self.available:
            tier, detail = residence(catalog, catalog.get(catalog.default_expert))
            raise WeightsMissingError(f"the default expert {catalog.default_expert!r} cannot run: weights {tier}", detail)

    @classmethod
    def from_config(cls, config: CoeConfig, backend: Backend | None = None) -> Pipeline:
        catalog = config.load_catalog()
        backend = backend or build_backend(config.backend.name, catalog, **config.backend.options)
        routers = {name: fit_policy(name, policy, catalog) for name, policy in config.policies.items()}
        return cls(catalog, backend, routers, config.default_policy)

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

    def run(self, queries: list[Query]) -> list[Result]:
        started = time.perf_counter()
        decisions = self.route(queries)
        routed = time.perf_counter()
        batch_plan = planner.plan(decisions, self.backend.resident())
        planned = time.perf_counter()
        load_seconds = sum(self.backend.load(group.expert) for group in batch_plan.groups)
        loaded = time.perf_counter()

        by_id = {q.id: q for q in queries}
        requests = [
            GenerationRequest(expert=choice.expert, messages=by_id[d.query_id].messages, params=by_id[d.query_id].params)
            for d in decisions for choice in d.chosen
        ]
        generated = iter(self.backend.generate(requests))
        answers = {d.query_id: [next(generated) for _ in d.chosen] for d in decisions}
        generated_at = time.perf_counter()

        texts = {d.query_id: aggregate(d, answers[d.query_id]) for d in decisions}
        finished = time.perf_counter()
        timings = {
            "route": routed - started, "plan": planned - routed, "load": load_seconds,
            "generate": generated_at - loaded, "aggregate": finished - generated_at, "total": finished - started,
        }
        return [self._result(d, answers[d.query_id], texts[d.query_id], timings) for d in decisions]

    async def arun(self, query: Query) -> Result:
        """One query as it arrives (a server's request). Its expert calls go to the backend's
        `agenerate`, so concurrent queries share the backend's batches (vLLM: the engine's steps;
        transformers: the next micro-batch). Cancelling the call stops its generation."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        [decision] = await loop.run_in_executor(None, self.route, [query])
        routed = time.perf_counter()
        load_seconds = 0.0
        for choice in decision.chosen:
            load_seconds += await loop.run_in_executor(None, self.backend.load, choice.expert)
        loaded = time.perf_counter()
        answers = list(await asyncio.gather(*(
            self.backend.agenerate(GenerationRequest(expert=choice.expert, messages=query.messages, params=query.params))
            for choice in decision.chosen)))
        generated_at = time.perf_counter()
        text = aggregate(decision, answers)
        finished = time.perf_counter()
        timings = {"route": routed - started, "plan": 0.0, "load": load_seconds, "generate": generated_at - loaded,
                   "aggregate": finished - generated_at, "total": finished - started}
        return self._result(decision, answers, text, timings)

    @staticmethod
    def _result(decision: Decision, answers: list[ExpertAnswer], text: str, timings: dict[str, float]) -> Result:
        usage = Usage(prompt_tokens=sum(a.prompt_tokens for a in answers),
                      completion_tokens=sum(a.completion_tokens for a in answers))
        finish = next((a.finish_reason for a in answers if a.text == text), answers[0].finish_reason)
        return Result(query_id=decision.query_id, text=text, decision=decision, answers=answers,
                      usage=usage, finish_reason=finish, timings=timings)

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
            "usage": {**result.usage.model_dump(), "total_tokens": result.usage.total_tokens},
            "finish_reason": result.finish_reason,
            "timings": {k: round(v, 4) for k, v in result.timings.items()},
        }
