"""Failing experts: retries, fallback to the next-ranked expert, cooldowns, aggregator failure and
fault injection, over a scripted in-memory backend (plain Python, milliseconds)."""

import time

import pytest

from core.config import FaultConfig, ResilienceConfig
from core.errors import ExpertsFailedError
from core.types import Decision, ExpertScore, Query, StreamPiece
from orchestrator.fallback import Cooldowns, FallbackRunner
from orchestrator.faults import FaultyBackend, InjectedFault
from tests.fakes import ScriptedBackend


def decision(qid, *experts, k=1, aggregator="passthrough", policy="knn"):
    return Decision(query_id=qid, policy=policy, k=k, aggregator=aggregator,
                    ranked=[ExpertScore(expert=e, score=1.0 - i / 10) for i, e in enumerate(experts)])


def run(runner, *decisions):
    queries = {d.query_id: Query(id=d.query_id, messages=[{"role": "user", "content": f"q{d.query_id}"}]) for d in decisions}
    return runner.generate(list(decisions), queries)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_healthy_mixed_batch_is_one_call():
    backend = ScriptedBackend()
    answers, incidents = run(FallbackRunner(backend), decision("1", "a", "b"), decision("2", "b", "a"))
    assert [a.expert for a in answers["1"]] == ["a"] and [a.expert for a in answers["2"]] == ["b"]
    assert backend.calls == [["a", "b"]] and incidents == {"1": [], "2": []}


def test_a_hiccup_is_retried_on_the_same_expert():
    backend = ScriptedBackend(fail_times={"a": 1})
    answers, incidents = run(FallbackRunner(backend), decision("1", "a", "b"))
    assert answers["1"][0].expert == "a"
    assert [(i.kind, i.expert, i.attempt) for i in incidents["1"]] == [("error", "a", 1)]


def test_a_broken_expert_falls_back_to_the_next_ranked_and_the_batch_isolates_it():
    backend = ScriptedBackend(broken={"a"})
    answers, incidents = run(FallbackRunner(backend), decision("1", "a", "b", "c"), decision("2", "c", "a"))
    assert answers["1"][0].expert == "b" and answers["2"][0].expert == "c"
    kinds = [(i.kind, i.expert) for i in incidents["1"]]
    assert kinds == [("error", "a"), ("error", "a"), ("fallback", "b")]  # first try + 1 retry, then fallback
    assert incidents["2"] == []  # the healthy expert's query is untouched


def test_retries_are_configurable():
    backend = ScriptedBackend(broken={"a"})
    _, incidents = run(FallbackRunner(backend, ResilienceConfig(retries=0)), decision("1", "a", "b"))
    assert [i.kind for i in incidents["1"]] == ["error", "fallback"]


def test_three_failures_cool_an_expert_down_then_it_is_tried_again():
    clock = Clock()
    backend = ScriptedBackend(broken={"a"})
    runner = FallbackRunner(backend, ResilienceConfig(retries=1), Cooldowns(failures=3, seconds=5, clock=clock))
    run(runner, decision("1", "a", "b"))  # 2 failures
    _, incidents = run(runner, decision("2", "a", "b"))  # the third: cooldown starts, no second try
    assert [i.kind for i in incidents["2"]] == ["error", "cooldown", "fallback"]
    assert runner.cooldowns.cooling_experts() == ["a"]
    backend.calls.clear()
    answers, incidents = run(runner, decision("3", "a", "b"))
    assert answers["3"][0].expert == "b" and backend.calls == [["b"]]  # a is skipped while cooling
    assert "cooling down" in incidents["3"][0].detail
    clock.now += 5.1
    backend.broken.clear()
    answers, _ = run(runner, decision("4", "a", "b"))
    assert answers["4"][0].expert == "a"  # tried again after the cooldown


def test_a_named_expert_with_nothing_to_fall_back_to_fails_alone():
    backend = ScriptedBackend(broken={"a"})
    answers, _ = run(FallbackRunner(backend), decision("1", "a", policy="a"), decision("2", "b", policy="b"))
    assert isinstance(answers["1"], ExpertsFailedError) and answers["1"].status_code == 503
    assert answers["2"][0].expert == "b"


def test_fallback_can_be_turned_off():
    answers, _ = run(FallbackRunner(ScriptedBackend(broken={"a"}), ResilienceConfig(fallback=False)), decision("1", "a", "b"))
    assert isinstance(answers["1"], ExpertsFailedError)


def test_k_experts_fall_back_to_distinct_experts():
    backend = ScriptedBackend(broken={"a"})
    answers, _ = run(FallbackRunner(backend), decision("1", "a", "b", "c", k=2))
    assert sorted(a.expert for a in answers["1"]) == ["b", "c"]


def test_a_timeout_counts_as_a_failure_and_never_hangs():
    backend = ScriptedBackend(slow={"a"}, delay=0.5)
    runner = FallbackRunner(backend, ResilienceConfig(timeout_seconds=0.05, retries=0))
    started = time.perf_counter()
    answers, incidents = run(runner, decision("1", "a", "b"))
    assert answers["1"][0].expert == "b" and time.perf_counter() - started < 0.4
    assert [i.kind for i in incidents["1"]] == ["timeout", "fallback"]


def test_an_aggregator_failure_returns_the_best_single_answer():
    def broken(decision, answers):
        raise ValueError("synthesis model down")

    runner = FallbackRunner(ScriptedBackend(), aggregate=broken)
    d = decision("1", "a", "b", k=2, aggregator="vote")
    answers, incidents = run(runner, d)
    text = runner.aggregate(d, answers["1"], incidents["1"])
    assert text == "a: q1" and incidents["1"][0].kind == "aggregator_error"


def test_stream_falls_back_before_the_first_token():
    runner = FallbackRunner(ScriptedBackend(broken={"a"}))
    query = Query(id="1", messages=[{"role": "user", "content": "hi there"}])
    events = list(runner.stream(decision("1", "a", "b"), query))
    text = "".join(e.text for e in events if isinstance(e, StreamPiece))
    assert text == "b: hi there"
    assert [e.kind for e in events if not isinstance(e, StreamPiece)] == ["error", "error", "fallback"]
    with pytest.raises(ExpertsFailedError):
        list(runner.stream(decision("2", "a", policy="a"), query))


def test_a_stream_that_fails_after_its_first_token_ends_with_a_503():
    class DiesMidStream(ScriptedBackend):
        def stream(self, request):
            yield StreamPiece(text="partial")
            raise ConnectionError("the replica died")

    runner = FallbackRunner(DiesMidStream())
    query = Query(id="1", messages=[{"role": "user", "content": "hi"}])
    events = runner.stream(decision("1", "a", "b"), query)
    assert next(events).text == "partial"
    with pytest.raises(ExpertsFailedError, match="expert a failed mid-stream: ConnectionError: the replica died"):
        next(events)


def test_fault_injection_fails_the_configured_share_of_calls():
    backend = FaultyBackend(ScriptedBackend(), FaultConfig(experts=["a"], rate=0.3, seed=1))
    failures = 0
    for _ in range(1000):
        try:
            backend._maybe_fail({"a"})
        except InjectedFault:
            failures += 1
    assert 250 < failures < 350
    backend._maybe_fail({"b"})  # never fails an expert it does not target
    runner = FallbackRunner(FaultyBackend(ScriptedBackend(), FaultConfig(experts=["a"], rate=1.0)))
    answers, incidents = run(runner, decision("1", "a", "b"))
    assert answers["1"][0].expert == "b" and "injected failure in a" in incidents["1"][0].detail


def test_a_bad_request_fails_alone_without_retry_or_fallback():
    from core.errors import PromptTooLongError

    class Picky(ScriptedBackend):
        def generate(self, requests):
            if any("too long" in r.messages[-1].content for r in requests):
                self.calls.append(["rejected"])
                raise PromptTooLongError("the prompt has 9000 tokens")
            return super().generate(requests)

    backend = Picky()
    runner = FallbackRunner(backend)
    queries = {q: Query(id=q, messages=[{"role": "user", "content": text}]) for q, text in (("1", "too long"), ("2", "fine"))}
    answers, incidents = runner.generate([decision("1", "a", "b"), decision("2", "a", "b")], queries)
    assert isinstance(answers["1"], PromptTooLongError) and answers["2"][0].expert == "a"
    assert incidents == {"1": [], "2": []} and runner.cooldowns.cooling_experts() == []


class AsyncScriptedBackend(ScriptedBackend):
    """ScriptedBackend with `agenerate` (one request as it arrives); `slow` experts await the delay
    and record whether they were cancelled."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cancelled: list[str] = []

    async def agenerate(self, request):
        import asyncio

        if request.expert in self.slow:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled.append(request.expert)
                raise
        slow, self.slow = self.slow, set()  # the sleep above was the slow part
        try:
            return self.generate([request])[0]
        finally:
            self.slow = slow


def arun(runner, d):
    import asyncio

    query = Query(id=d.query_id, messages=[{"role": "user", "content": f"q{d.query_id}"}])
    return asyncio.run(runner.agenerate(d, query))


@pytest.mark.parametrize("backend_class", [ScriptedBackend, AsyncScriptedBackend])
def test_one_query_as_it_arrives_gets_the_same_retries_and_fallback(backend_class):
    """`agenerate` (Pipeline.arun's path) over a backend with or without `agenerate`."""
    answers, incidents = arun(FallbackRunner(backend_class(broken={"a"}, fail_times={"c": 1})), decision("1", "a", "b", "c", k=2))
    assert [a.expert for a in answers] == ["c", "b"]  # a's slot moves to c (b answers already); c's hiccup is retried
    assert sorted((i.kind, i.expert) for i in incidents) == [("error", "a"), ("error", "a"), ("error", "c"), ("fallback", "c")]


def test_one_query_as_it_arrives_a_timeout_cancels_the_call_and_falls_back():
    backend = AsyncScriptedBackend(slow={"a"}, delay=5.0)
    started = time.perf_counter()
    answers, incidents = arun(FallbackRunner(backend, ResilienceConfig(retries=0, timeout_seconds=0.1)), decision("1", "a", "b"))
    assert [a.expert for a in answers] == ["b"] and time.perf_counter() - started < 2
    assert backend.cancelled == ["a"] and [(i.kind, i.expert) for i in incidents] == [("timeout", "a"), ("fallback", "b")]


def test_one_query_as_it_arrives_with_nothing_left_fails_with_its_error():
    with pytest.raises(ExpertsFailedError):
        arun(FallbackRunner(AsyncScriptedBackend(broken={"a"})), decision("1", "a", policy="a"))
