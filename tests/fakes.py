"""In-memory stand-ins for tests of the plain-Python core and the HTTP API (no torch, no Ray)."""

import time

from core.types import Decision, ExpertAnswer, ExpertScore, StreamPiece
from experts.backends.base import MicroBatching


class ScriptedBackend(MicroBatching):
    """Answers `<expert>: <question>`; experts in `broken` raise, `slow` ones sleep first. Requests
    in flight are micro-batched (`calls` records the experts of each batch call); a streamed
    request runs alone, word by word."""

    name = "scripted"
    pool = None
    max_concurrent_batches = 4  # like a server: a slow call does not hold the others up

    def __init__(self, broken=(), fail_times=None, slow=(), delay=0.2):
        self.broken = set(broken)
        self.fail_times = dict(fail_times or {})  # expert -> failures before it works
        self.slow, self.delay = set(slow), delay
        self.calls: list[list[str]] = []

    def _check(self, experts):
        self.calls.append(sorted(experts))
        if experts & self.slow:
            time.sleep(self.delay)
        for expert in sorted(experts):
            if expert in self.broken:
                raise RuntimeError(f"{expert} is broken")
            if self.fail_times.get(expert, 0) > 0:
                self.fail_times[expert] -= 1
                raise RuntimeError(f"{expert} hiccup")

    def generate(self, requests):
        self._check({r.expert for r in requests})
        return [ExpertAnswer(expert=r.expert, text=f"{r.expert}: {r.messages[-1].content}", completion_tokens=2)
                for r in requests]

    async def astream(self, request):
        if not request.stream:
            async for piece in MicroBatching.astream(self, request):
                yield piece
            return
        self._check({request.expert})
        words = f"{request.expert}: {request.messages[-1].content}".split(" ")
        for i, word in enumerate(words):
            yield StreamPiece(text=word if i == 0 else " " + word)
        yield StreamPiece(answer=ExpertAnswer(expert=request.expert, text=" ".join(words)))

    def load(self, expert):
        return 0.0

    def resident(self):
        return {}


class ScriptedRouter:
    """Routes by a script: query text -> (ranked experts, k, aggregator[, cascade threshold]);
    unknown texts rank `default`. Scores fall by 0.1 per rank from 1.0; `aggregator_expert` writes
    every synthesis (None: the engine's default, the best-ranked expert)."""

    name = "scripted"

    def __init__(self, script: dict, default=("smollm2-135m",), aggregator_expert: str | None = None):
        self.script, self.default, self.aggregator_expert = script, default, aggregator_expert

    def route(self, texts, query_ids=None, policy=None, **_):
        decisions = []
        for text, qid in zip(texts, query_ids):
            experts, k, aggregator, *cascade = self.script.get(text, (self.default, 1, "passthrough"))
            decisions.append(Decision(query_id=qid, policy=policy or self.name, k=k, aggregator=aggregator,
                                      cascade=cascade[0] if cascade else None, aggregator_expert=self.aggregator_expert,
                                      ranked=[ExpertScore(expert=e, score=1.0 - i / 10) for i, e in enumerate(experts)]))
        return decisions


class KeywordRouter:
    """Routes by keyword (math, science, medicine, logic), the base model otherwise; k=1."""

    name = "keyword"
    experts = ["smollm2-135m", "smollm2-math", "smollm2-science", "smollm2-medicine", "smollm2-logic"]

    def route(self, texts, query_ids=None, policy=None, **_):
        decisions = []
        for text, qid in zip(texts, query_ids):
            hit = next((e for e in self.experts[1:] if e.split("-")[1] in text.lower()), self.experts[0])
            ranked = [hit] + [e for e in self.experts if e != hit]
            decisions.append(Decision(query_id=qid, policy=policy or self.name, explanation=f"keyword -> {hit}",
                                      ranked=[ExpertScore(expert=e, score=1.0 - i / 10) for i, e in enumerate(ranked)]))
        return decisions
