"""Failing experts through the engine's one loop: retries, fallback to the next-ranked expert,
cooldowns, aggregator failure, streams and fault injection, over a scripted in-memory backend
(plain Python, milliseconds). A batch, a single request and a stream take the same path."""

import asyncio
import time

import pytest

from core.catalog import load_catalog
from core.config import FaultConfig, ResilienceConfig
from core.errors import ExpertsFailedError, PromptTooLongError
from core.types import ExpertAnswer, Query, Result, StreamPiece, StreamStart
from orchestrator import aggregators
from orchestrator.fallback import Cooldowns
from orchestrator.faults import FaultyBackend, InjectedFault
from orchestrator.pipeline import Pipeline
from tests.fakes import ScriptedBackend, ScriptedRouter

# Three LoRA experts of one base: a batch mixing them runs as one stage (one backend call).
A, B, C = "smollm2-math", "smollm2-science", "smollm2-logic"


ENGINES: list[Pipeline] = []


@pytest.fixture(autouse=True)
def _close_engines():
    yield
    while ENGINES:
        ENGINES.pop().close()


def engine(backend, script, resilience=None):
    ENGINES.append(Pipeline(load_catalog(), backend, {"scripted": ScriptedRouter(script)}, "scripted", resilience))
    return ENGINES[-1]


def ask(qid, text=None, policy=None):
    return Query(id=qid, messages=[{"role": "user", "content": text or f"q{qid}"}], policy=policy)


def by_id(outcomes):
    return {(o.query_id if isinstance(o, Result) else str(i)): o for i, o in enumerate(outcomes)}


def kinds(result, with_attempt=False):
    return [(i.kind, i.expert, i.attempt) if with_attempt else (i.kind, i.expert) for i in result.incidents]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_healthy_mixed_batch_is_one_call():
    backend = ScriptedBackend()
    pipeline = engine(backend, {"q1": ([A, B], 1, "passthrough"), "q2": ([B, A], 1, "passthrough")})
    one, two = pipeline.run([ask("1"), ask("2")])
    assert one.experts == [A] and two.experts == [B] and one.text == f"{A}: q1"
    assert backend.calls == [sorted([A, B])] and one.incidents == two.incidents == []


def test_a_hiccup_is_retried_on_the_same_expert():
    pipeline = engine(ScriptedBackend(fail_times={A: 1}), {"q1": ([A, B], 1, "passthrough")})
    [result] = pipeline.run([ask("1")])
    assert result.experts == [A] and kinds(result, True) == [("error", A, 1)]


def test_a_broken_expert_falls_back_to_the_next_ranked_and_the_batch_isolates_it():
    pipeline = engine(ScriptedBackend(broken={A}), {"q1": ([A, B, C], 1, "passthrough"), "q2": ([C, A], 1, "passthrough")})
    one, two = pipeline.run([ask("1"), ask("2")])
    assert one.experts == [B] and two.experts == [C]
    assert kinds(one) == [("error", A), ("error", A), ("fallback", B)]  # first try + 1 retry, then fallback
    assert two.incidents == [] and not two.fell_back and one.fell_back  # the healthy expert's query is untouched


def test_retries_are_configurable():
    pipeline = engine(ScriptedBackend(broken={A}), {"q1": ([A, B], 1, "passthrough")}, ResilienceConfig(retries=0))
    [result] = pipeline.run([ask("1")])
    assert [k for k, _ in kinds(result)] == ["error", "fallback"]


def test_three_failures_cool_an_expert_down_then_it_is_tried_again():
    clock = Clock()
    backend = ScriptedBackend(broken={A})
    pipeline = engine(backend, {f"q{i}": ([A, B], 1, "passthrough") for i in range(1, 5)}, ResilienceConfig(retries=1))
    pipeline.runner.cooldowns = Cooldowns(failures=3, seconds=5, clock=clock)
    pipeline.run([ask("1")])  # 2 failures
    [second] = pipeline.run([ask("2")])  # the third: cooldown starts, no second try
    assert [k for k, _ in kinds(second)] == ["error", "cooldown", "fallback"]
    assert pipeline.runner.cooldowns.cooling_experts() == [A]
    backend.calls.clear()
    [third] = pipeline.run([ask("3")])
    assert third.experts == [B] and backend.calls == [[B]]  # A is skipped while cooling
    assert "cooling down" in third.incidents[0].detail
    clock.now += 5.1
    backend.broken.clear()
    [fourth] = pipeline.run([ask("4")])
    assert fourth.experts == [A]  # tried again after the cooldown


def test_a_named_expert_with_nothing_to_fall_back_to_fails_alone():
    pipeline = engine(ScriptedBackend(broken={A}), {})
    failed, answered = pipeline.run([ask("1", policy=A), ask("2", policy=B)], return_errors=True)
    assert isinstance(failed, ExpertsFailedError) and failed.status_code == 503
    assert answered.experts == [B]
    with pytest.raises(ExpertsFailedError):
        pipeline.run([ask("3", policy=A)])


def test_fallback_can_be_turned_off():
    pipeline = engine(ScriptedBackend(broken={A}), {"q1": ([A, B], 1, "passthrough")}, ResilienceConfig(fallback=False))
    [outcome] = pipeline.run([ask("1")], return_errors=True)
    assert isinstance(outcome, ExpertsFailedError)


def test_k_experts_fall_back_to_distinct_experts():
    pipeline = engine(ScriptedBackend(broken={A}), {"q1": ([A, B, C], 2, "vote")})
    [result] = pipeline.run([ask("1")])
    assert sorted(result.experts) == sorted([B, C])


@pytest.mark.timeout(60)
def test_a_timeout_counts_as_a_failure_and_falls_back():
    backend = ScriptedBackend(slow={A}, delay=0.5)
    pipeline = engine(backend, {"q1": ([A, B], 1, "passthrough")}, ResilienceConfig(timeout_seconds=0.05, retries=0))
    [result] = pipeline.run([ask("1")])
    assert result.experts == [B] and [k for k, _ in kinds(result)] == ["timeout", "fallback"]


def test_an_aggregator_failure_returns_the_best_single_answer(monkeypatch):
    def broken(decision, answers):
        raise ValueError("synthesis model down")

    monkeypatch.setitem(aggregators.AGGREGATORS, "vote", broken)
    [result] = engine(ScriptedBackend(), {"q1": ([A, B], 2, "vote")}).run([ask("1")])
    assert result.text == f"{A}: q1" and result.incidents[0].kind == "aggregator_error"


def test_a_synthesis_is_one_more_round_written_by_the_aggregator_expert():
    backend = ScriptedBackend()
    pipeline = engine(backend, {"q1": ([A, B, C], 2, "synthesis")})
    [result] = pipeline.run([ask("1")])
    assert result.experts == [A, B] and result.aggregated_by == A  # the best-ranked writes by default
    assert result.text.startswith(f"{A}: ") and "Answer 2 (smollm2-science)" in result.text
    assert backend.calls == [sorted([A, B]), [A]]  # the answers, then the synthesis
    writer_down = engine(ScriptedBackend(), {"q2": ([B, C], 2, "synthesis")})
    writer_down.routers["scripted"].aggregator_expert = A
    writer_down.backend.broken = {A}  # a failing aggregator leaves the best single answer
    [fallback] = writer_down.run([ask("2")])
    assert fallback.text == f"{B}: q2" and fallback.incidents[-1].kind == "aggregator_error"
    assert fallback.aggregated_by is None


def test_a_cascade_calls_the_next_expert_only_while_predicted_success_is_low():
    backend = ScriptedBackend()
    pipeline = engine(backend, {"q1": ([A, B, C], 3, "vote", 0.95), "q2": ([A, B, C], 3, "vote", 1.5)})
    [confident] = pipeline.run([ask("1")])
    assert confident.experts == [A]  # A's predicted success (1.0) clears the bar: nobody else is called
    [unsure] = pipeline.run([ask("2")])
    assert unsure.experts == [A, B, C]  # never clears it: all k, one round each
    assert backend.calls == [[A], [A], [B], [C]]


def collect(pipeline, query):
    async def run():
        return [event async for event in pipeline.astream(query)]

    return asyncio.run(run())


def test_a_stream_falls_back_before_its_first_token():
    pipeline = engine(ScriptedBackend(broken={A}), {"hi there": ([A, B], 1, "passthrough")})
    events = collect(pipeline, ask("1", "hi there"))
    assert isinstance(events[0], StreamStart) and isinstance(events[-1], Result)
    assert "".join(e.text for e in events if isinstance(e, StreamPiece)) == f"{B}: hi there"
    assert [k for k, _ in kinds(events[-1])] == ["error", "error", "fallback"]
    with pytest.raises(ExpertsFailedError):
        collect(pipeline, ask("2", policy=A))


def test_a_stream_that_fails_after_its_first_token_ends_with_a_503():
    class DiesMidStream(ScriptedBackend):
        async def astream(self, request):
            yield StreamPiece(text="partial")
            raise ConnectionError("the replica died")

    pipeline = engine(DiesMidStream(), {"hi": ([A, B], 1, "passthrough")})

    async def run():
        events = pipeline.astream(ask("1", "hi"))
        assert isinstance(await events.__anext__(), StreamStart)
        assert (await events.__anext__()).text == "partial"
        with pytest.raises(ExpertsFailedError, match=f"expert {A} failed mid-stream: ConnectionError: the replica died"):
            await events.__anext__()

    asyncio.run(run())


def test_a_streamed_vote_sends_its_answer_in_one_piece():
    events = collect(engine(ScriptedBackend(), {"hi": ([A, B], 2, "vote")}), ask("1", "hi"))
    pieces = [e.text for e in events if isinstance(e, StreamPiece)]
    assert pieces == [f"{A}: hi"] and events[-1].experts == [A, B]


def test_fault_injection_fails_the_configured_share_of_calls():
    backend = FaultyBackend(ScriptedBackend(), FaultConfig(experts=[A], rate=0.3, seed=1))
    failures = 0
    for _ in range(1000):
        try:
            backend._maybe_fail({A})
        except InjectedFault:
            failures += 1
    assert 250 < failures < 350
    backend._maybe_fail({B})  # never fails an expert it does not target
    faulty = FaultyBackend(ScriptedBackend(), FaultConfig(experts=[A], rate=1.0))
    [result] = engine(faulty, {"q1": ([A, B], 1, "passthrough")}).run([ask("1")])
    assert result.experts == [B] and f"injected failure in {A}" in result.incidents[0].detail


def test_a_bad_request_fails_alone_without_retry_or_fallback():
    class Picky(ScriptedBackend):
        def generate(self, requests):
            if any("too long" in r.messages[-1].content for r in requests):
                self.calls.append(["rejected"])
                raise PromptTooLongError("the prompt has 9000 tokens")
            return super().generate(requests)

    pipeline = engine(Picky(), {"too long": ([A, B], 1, "passthrough"), "fine": ([A, B], 1, "passthrough")})
    failed, answered = pipeline.run([ask("1", "too long"), ask("2", "fine")], return_errors=True)
    assert isinstance(failed, PromptTooLongError) and answered.experts == [A]
    assert answered.incidents == [] and pipeline.runner.cooldowns.cooling_experts() == []


class AsyncScriptedBackend(ScriptedBackend):
    """A backend whose requests run as they arrive (like vLLM's); `slow` experts await the delay
    and record whether they were cancelled."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def astream(self, request):
        self.started.append(request.expert)
        if request.expert in self.slow:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled.append(request.expert)
                raise
        self._check({request.expert} - self.slow)
        yield StreamPiece(answer=ExpertAnswer(expert=request.expert, text=f"{request.expert}: {request.messages[-1].content}"))


@pytest.mark.parametrize("backend_class", [ScriptedBackend, AsyncScriptedBackend])
def test_queries_arriving_one_by_one_get_the_same_retries_and_fallback(backend_class):
    """`arun` from another event loop (a server's path) over a batching or an as-it-arrives backend."""
    pipeline = engine(backend_class(broken={A}, fail_times={C: 1}), {"q1": ([A, B, C], 2, "vote")})
    [result] = asyncio.run(pipeline.arun([ask("1")]))
    assert result.experts == [B, C]  # A's slot moves to C (B answers already); C's hiccup is retried; rank order
    assert sorted(kinds(result)) == sorted([("error", A), ("error", A), ("error", C), ("fallback", C)])


def test_a_timeout_cancels_the_call_and_falls_back():
    # The timeout is far from both the slow call (60 s) and the quick one (milliseconds, even on a busy machine).
    backend = AsyncScriptedBackend(slow={A}, delay=60.0)
    pipeline = engine(backend, {"q1": ([A, B], 1, "passthrough")}, ResilienceConfig(retries=0, timeout_seconds=1.0))
    [result] = asyncio.run(pipeline.arun([ask("1")]))
    assert result.experts == [B] and backend.cancelled == [A]
    assert kinds(result) == [("timeout", A), ("fallback", B)]


def test_cancelling_the_caller_cancels_the_work():
    backend = AsyncScriptedBackend(slow={A}, delay=30.0)
    pipeline = engine(backend, {"q1": ([A, B], 1, "passthrough")})

    async def run():
        task = asyncio.ensure_future(pipeline.arun([ask("1")]))
        deadline = time.monotonic() + 10
        while backend.started != [A]:  # the slow call is under way
            assert time.monotonic() < deadline, backend.started
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while backend.cancelled != [A] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.cancelled == [A]
