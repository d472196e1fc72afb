"""The memory pool with the real transformers backend: SmolLM2 and its LoRA experts moved between
tiers by HFMover, within a device budget too small for all of them."""

from __future__ import annotations

import pytest

from core.types import GenerationParams, GenerationRequest, Message, Query
from orchestrator.pipeline import Pipeline

QUESTION = "Which of the following is a mammal?\n\nA. Shark\nB. Dolphin\nC. Trout\nD. Octopus"
ADAPTERS = ["smollm2-math", "smollm2-science", "smollm2-medicine", "smollm2-logic"]


def req(expert, text=QUESTION):
    return GenerationRequest(expert=expert, messages=[Message(role="user", content=text)],
                             params=GenerationParams(max_tokens=10))


@pytest.fixture(scope="module")
def small_backend(catalog):
    """Device room for the base and two adapters; host room for the base and one adapter."""
    from experts.backends.hf import HFBackend

    probe = HFBackend(catalog, dtype="float32", pool={"device_bytes": 1, "host_bytes": 1})
    base, adapter = probe.pool.state().sizes["smollm2-135m"], probe.pool.state().sizes["smollm2-math"]
    return HFBackend(catalog, dtype="float32", pool={"device_bytes": base + 2 * adapter,
                                                     "host_bytes": base + 2 * adapter, "host_adapters": 1})


def test_experts_move_through_the_tiers_and_answer_as_before(small_backend, hf_backend):
    pool = small_backend.pool
    expected = {a.expert: a.text for a in hf_backend.generate([req(e) for e in ["smollm2-135m", *ADAPTERS]])}

    first = small_backend.generate([req("smollm2-math"), req("smollm2-science")])  # one mixed-LoRA pass
    assert pool.tier("smollm2-135m") == pool.tier("smollm2-math") == pool.tier("smollm2-science") == "device"
    second = small_backend.generate([req("smollm2-medicine"), req("smollm2-logic")])
    residence = pool.residence()
    assert residence["smollm2-medicine"] == residence["smollm2-logic"] == "device"
    assert sorted(residence[a] for a in ("smollm2-math", "smollm2-science")) == ["disk", "host"]  # one kept on host
    again = small_backend.generate([req("smollm2-math"), req("smollm2-science"), req("smollm2-135m")])
    assert [a.text for a in first + second] == [expected[e] for e in ADAPTERS]
    assert [a.text for a in again] == [expected["smollm2-math"], expected["smollm2-science"], expected["smollm2-135m"]]

    pool.evict("smollm2-135m", to="host")  # the base leaves the device, with its adapters
    assert pool.tier("smollm2-135m") == "host" and "device" not in pool.residence().values()
    assert not small_backend._bases
    [base_again] = small_backend.generate([req("smollm2-135m")])
    assert base_again.text == expected["smollm2-135m"]

    stats = pool.stats()
    usage = pool.usage()
    assert all(u["resident"] <= u["budget"] for u in usage.values())
    assert stats.moves["host->device"] == stats.loads >= 8 and stats.evictions >= 4
    assert stats.moves.get("disk->host", 0) < stats.loads  # some loads came from the host tier
    assert stats.per_expert["smollm2-135m"].loads == 2


def test_pipeline_runs_a_batch_through_the_pool_one_load_per_expert(small_backend, catalog, hf_backend):
    small_backend.pool.evict("smollm2-135m", to="disk")
    small_backend.pool.reset_stats()
    pipeline = Pipeline(catalog, small_backend, routers={}, default_policy="none")
    experts = ["smollm2-medicine", "smollm2-math", "smollm2-medicine", "smollm2-135m", "smollm2-math"]
    results = pipeline.run([Query.from_text(QUESTION, policy=e, params=GenerationParams(max_tokens=10)) for e in experts])
    expected = {a.expert: a.text for a in hf_backend.generate([req(e) for e in dict.fromkeys(experts)])}
    assert [r.text for r in results] == [expected[e] for e in experts]
    stats = small_backend.pool.stats()
    assert stats.loads == results[0].timings["loads"] == 3  # base, math, medicine: once each
    timings = results[0].timings
    assert timings["load"] > 0 and timings["load_transfer"] >= timings["load_hidden"] >= 0
    assert timings["generate"] > 0 and timings["total"] >= timings["generate"]
