"""What the engine adds to a router's decision per request: the cost knob from the model name or
the body, conversations kept on their expert, and a shadow router deciding alongside
(plain Python over a scripted backend, milliseconds; the HTTP parts through the in-process app)."""

import pytest
from fastapi.testclient import TestClient

from core.catalog import load_catalog
from core.errors import CoeError
from core.types import Query
from deploy.server import LocalPipelineClient, build_api
from orchestrator.pipeline import Pipeline, split_cost_knob
from orchestrator.sessions import Sessions
from routers import build_router
from tests.fakes import ScriptedBackend, ScriptedRouter
from tests.test_routing import one_hot_embed

A, B, C = "smollm2-math", "smollm2-science", "smollm2-logic"


def test_the_cost_knob_rides_on_the_model_name():
    assert split_cost_knob("coe-knn@0.3") == ("coe-knn", 0.3)
    assert split_cost_knob("coe-knn") == ("coe-knn", None)
    for bad in ("coe-knn@cheap", "coe-knn@1.5"):
        with pytest.raises(CoeError, match="cost knob"):
            split_cost_knob(bad)


def knob_pipeline():
    """A kNN router over two topics where the expensive expert A is right on alpha and the cheap B
    half right everywhere: the knob decides how often A is worth its price."""
    from routers import OutcomeData

    texts, outcomes = [], []
    for i in range(12):
        texts += [f"alpha question {i}", f"beta question {i}"]
        outcomes += [[1.0, 0.6], [0.7, 0.5]]
    router = build_router("knn", embed=one_hot_embed, neighbours=4, margin=0.0, min_similarity=0.0,
                          costs={A: 10.0, B: 1.0}).fit(OutcomeData(texts=texts, experts=[A, B], outcomes=outcomes))
    return Pipeline(load_catalog(), ScriptedBackend(), {"knn": router}, "knn")


def test_a_higher_cost_threshold_never_raises_the_mean_cost():
    pipeline = knob_pipeline()
    questions = [f"{topic} new {i}" for topic in ("alpha", "beta") for i in range(5)]
    price = {A: 10.0, B: 1.0}
    mean_costs = []
    for knob in (0.0, 0.1, 0.25, 0.35, 0.5, 1.0):
        results = pipeline.run([Query.from_text(q, policy=f"coe-knn@{knob}") for q in questions])
        mean_costs.append(sum(price[r.experts[0]] for r in results) / len(results))
    assert mean_costs == sorted(mean_costs, reverse=True) and mean_costs[0] > mean_costs[-1]
    in_body = pipeline.run([Query.from_text("alpha new 1", policy="coe-knn", cost_threshold=1.0)])[0]
    assert in_body.experts == [B]  # the body's knob, as the model name's
    with pytest.raises(CoeError, match="routing policies only"):
        pipeline.resolve_policy(f"{A}@0.3")
    pipeline.close()


def test_a_conversation_stays_on_its_expert_unless_another_is_clearly_better():
    router = ScriptedRouter({})
    script = {"turn 1": [A, B], "turn 2": [B, A], "turn 3": [B, C, A]}
    scores = {"turn 1": [1.0, 0.9], "turn 2": [1.0, 0.97], "turn 3": [1.0, 0.9, 0.5]}

    def route(texts, query_ids=None, policy=None, **_):
        decisions = ScriptedRouter({t: (script[t], 1, "passthrough") for t in texts}).route(texts, query_ids, policy)
        return [d.model_copy(update={"ranked": [s.model_copy(update={"score": v}) for s, v in zip(d.ranked, scores[t])]})
                for d, t in zip(decisions, texts)]

    router.route = route
    pipeline = Pipeline(load_catalog(), ScriptedBackend(), {"scripted": router}, "scripted",
                        sessions=Sessions(), session_margin=0.05)
    answered = [pipeline.run([Query.from_text(t, session="s1")])[0] for t in ("turn 1", "turn 2", "turn 3")]
    assert [r.experts[0] for r in answered] == [A, A, B]  # 0.03 behind: stays; 0.5 behind: moves on
    assert "stays with" in answered[1].decision.explanation
    alone = pipeline.run([Query.from_text("turn 2")])[0]
    assert alone.experts == [B]  # without a session, the router's own choice
    pipeline.close()


def test_a_shadow_router_decides_alongside_and_is_counted():
    serving = ScriptedRouter({"q": ([A, B], 1, "passthrough")})
    candidate = ScriptedRouter({"q": ([B, A], 1, "passthrough")})
    pipeline = Pipeline(load_catalog(), ScriptedBackend(), {"live": serving, "candidate": candidate}, "live",
                        shadows={"live": "candidate"})
    client = TestClient(build_api(LocalPipelineClient(pipeline)))
    reply = client.post("/v1/chat/completions", json={"model": "coe", "messages": [{"role": "user", "content": "q"}]})
    assert reply.status_code == 200
    coe = reply.json()["coe"]
    assert coe["answered_by"] == [A] and coe["shadow"] == {"policy": "candidate", "chosen": [B], "agrees": False}
    metrics = client.get("/metrics").text
    assert 'coe_shadow_decisions_total{agrees="false",policy="live",shadow="candidate"}' in metrics
    session = client.post("/v1/chat/completions", headers={"x-coe-session": "abc"},
                          json={"model": "coe", "messages": [{"role": "user", "content": "q"}]})
    assert session.status_code == 200 and pipeline.sessions.get(["abc"]) == {"abc": A}
    pipeline.close()


def test_a_resident_expert_wins_within_the_load_penalty():
    from experts.pool import NullMover, TierBudgets, TieredPool
    from routers import OutcomeData

    texts = [f"question {i}" for i in range(8)]
    data = OutcomeData(texts=texts, experts=[A, B], outcomes=[[1.0, 0.97]] * 8)
    catalog = load_catalog()
    backend = ScriptedBackend()
    backend.pool = TieredPool(TierBudgets(device=10**12, host=10**12), NullMover())
    backend.pool.add_catalog(catalog)
    backend.pool.ensure(B)  # B (and its base) on the device; A on disk

    def pipeline_with(penalty):
        router = build_router("knn", embed=one_hot_embed, neighbours=4, margin=0.0, min_similarity=0.0,
                              load_penalty=penalty).fit(data)
        return Pipeline(catalog, backend, {"knn": router}, "knn")

    quality_only, residency_aware = pipeline_with(0.0), pipeline_with(0.05)
    assert backend.pool.seconds_to_device([A, B]) == {A: pytest.approx(backend.pool.state().sizes[A] * 2 / 1e9), B: 0.0}
    chosen = residency_aware.run([Query.from_text("question new")])[0]
    assert chosen.experts == [B] and "loads faster" in chosen.decision.explanation
    assert quality_only.run([Query.from_text("question new")])[0].experts == [A]  # no penalty: the better one
    quality_only.close()
    residency_aware.close()


def test_every_response_can_be_scored_by_its_id(tmp_path):
    from orchestrator.feedback import FeedbackStore

    pipeline = Pipeline(load_catalog(), ScriptedBackend(), {"scripted": ScriptedRouter({"q": ([A, B], 1, "passthrough")})},
                        "scripted")
    store = FeedbackStore(tmp_path / "feedback.sqlite3")
    client = TestClient(build_api(LocalPipelineClient(pipeline), feedback=store))
    ask = {"model": "coe", "messages": [{"role": "user", "content": "q"}]}
    reply = client.post("/v1/chat/completions", json=ask).json()
    assert reply["id"] == f"chatcmpl-{reply['coe']['id']}"
    scored = client.post("/v1/feedback", json={"id": reply["id"], "score": 1})
    assert scored.status_code == 200 and scored.json() == {"id": reply["id"], "policy": "scripted", "experts": [A], "score": 1.0}
    assert client.post("/v1/feedback", json={"id": "chatcmpl-nope", "score": 1}).status_code == 404
    bad = client.post("/v1/feedback", json={"id": reply["id"], "score": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"
    streamed = client.post("/v1/chat/completions", json={**ask, "stream": True}).text
    stream_id = next(line for line in streamed.splitlines() if line.startswith("data: {"))[6:].split('"id": "')[1].split('"')[0]
    assert store.get(stream_id)["experts"] == [A]  # a stream is kept once its last chunk is out
    pipeline.close()
