"""Routers on outcome data: each router's behaviour on small synthetic data where the right answer
is known, the shared cost knob and its calibration, persistence, and the offline metrics."""

import numpy as np
import pytest

from core.errors import CoeError
from evals.metrics import call_cost, curve_summary, paired_interval, realised_accuracy
from routers import ROUTERS, OutcomeData, build_router, load_router
from routers.base import calibrate_cost_threshold
from tests.test_routing import one_hot_embed

EMBEDDING_ROUTERS = ["knn", "coe", "symbolic", "glider"]


def two_topics(rows_per_topic=6) -> OutcomeData:
    """Expert `a` is right on every alpha question and wrong on beta; `b` the reverse; `c` is
    right on half of each (so `c` is never the specialist, and a or b is the single best)."""
    texts, outcomes, categories = [], [], []
    for i in range(rows_per_topic):
        texts += [f"alpha question {i}", f"beta question {i}"]
        outcomes += [[1, 0, i % 2], [0, 1, i % 2]]
        categories += ["alpha", "beta"]
    return OutcomeData(texts=texts, experts=["a", "b", "c"], outcomes=outcomes, categories=categories,
                       ids=[f"q{i}" for i in range(len(texts))])


@pytest.mark.parametrize("name", EMBEDDING_ROUTERS)
def test_an_expert_perfect_on_a_topic_gets_that_topic(name):
    options = {"k": 1} if name == "symbolic" else {}
    router = build_router(name, embed=one_hot_embed, **options).fit(two_topics())
    alpha, beta = router.route(["alpha new", "beta new"])
    assert alpha.chosen[0].expert == "a", alpha
    assert beta.chosen[0].expert == "b", beta


def test_coe_names_the_category_and_sends_unsure_queries_to_the_general_expert():
    router = build_router("coe", embed=one_hot_embed, min_confidence=0.6, fallback_expert="general").fit(two_topics())
    sure, unsure = router.route(["alpha new", "delta new"])
    assert sure.chosen[0].expert == "a" and "category 'alpha'" in sure.explanation
    assert unsure.chosen[0].expert == "general" and "unsure" in unsure.explanation


def test_symbolic_recruits_k_experts_with_a_vote_and_names_the_aggregator():
    router = build_router("symbolic", embed=one_hot_embed).fit(two_topics())
    [decision] = router.route(["alpha new"])
    assert decision.k == 3 and decision.aggregator == "vote"
    assert [s.expert for s in decision.chosen][0] == "a"
    assert "aggregator" in decision.explanation and "skills" in decision.explanation


def test_symbolic_mines_informative_keywords_from_the_questions():
    from routers.symbolic import mine_keywords

    texts = [f"enthalpy of reaction {i}" for i in range(10)] + [f"plain sentence number {i}" for i in range(10)]
    texts += [f"filler words {i}" for i in range(200)]
    outcomes = np.array([[1, 0]] * 10 + [[0.5, 0.5]] * 210)
    keywords = mine_keywords(texts, outcomes, outcomes.mean(axis=0), count=1)
    assert keywords == ["enthalpy"]  # where the models' accuracies differ most from their overall ones


def toy_token_states(texts, layer):
    """Per-token stand-in states: one row per word, the word's one-hot vector."""
    return [one_hot_embed(t.split()) for t in texts]


def test_glider_local_gates_alone_route_by_token_states():
    # The global router cannot tell the topics apart (one embedding for every text); the
    # PHATGOOSE-style gates on the token states can.
    def blind_embed(texts):
        return np.ones((len(texts), 4), dtype=np.float32) / 2

    router = build_router("glider", embed=blind_embed, local_weight=1.0, token_states=toy_token_states).fit(two_topics())
    alpha, beta = router.route(["alpha new", "beta new"])
    assert alpha.chosen[0].expert == "a" and beta.chosen[0].expert == "b"
    assert "local gates" in alpha.explanation


def test_single_best_is_the_best_on_the_fitting_data():
    data = OutcomeData(texts=["x", "y", "z"], experts=["weak", "strong"], outcomes=[[0, 1], [1, 1], [0, 1]])
    router = build_router("single_best").fit(data)
    assert [d.chosen[0].expert for d in router.route(["anything", "else"])] == ["strong", "strong"]


def test_random_is_repeatable_and_spreads_over_experts():
    data = OutcomeData(texts=["x"], experts=["a", "b", "c"], outcomes=[[1, 1, 1]])
    router = build_router("random", seed=3).fit(data)
    texts = [f"query {i}" for i in range(300)]
    first = [d.chosen[0].expert for d in router.route(texts)]
    assert first == [d.chosen[0].expert for d in router.route(texts)]
    assert set(first) == {"a", "b", "c"}


def test_oracle_picks_the_cheapest_correct_expert_and_needs_the_outcomes():
    data = OutcomeData(texts=["q1", "q2", "q3"], experts=["cheap", "mid", "dear"],
                       outcomes=[[0, 1, 1], [1, 1, 1], [0, 0, 0]])
    oracle = build_router("oracle", costs={"cheap": 1, "mid": 5, "dear": 50}).fit(data)
    with pytest.raises(CoeError, match="reveal"):
        oracle.route(["q1"])
    oracle.reveal(data)
    assert [d.chosen[0].expert for d in oracle.route(["q1", "q2", "q3"])] == ["mid", "cheap", "cheap"]


# -- the shared cost knob, fallback margin and calibration ----------------------------------------

def fixed_scores_router(scores, costs, **options):
    """A single-best router whose prior (its score for every query) is set by hand."""
    data = OutcomeData(texts=["x"], experts=list(costs), outcomes=[scores])
    return build_router("single_best", costs=costs, **options).fit(data)


def test_cost_knob_picks_the_cheaper_expert_within_the_threshold():
    costs = {"dear": 10.0, "cheap": 1.0}
    assert fixed_scores_router([0.8, 0.75], costs, cost_threshold=0.1).route(["q"])[0].chosen[0].expert == "cheap"
    assert fixed_scores_router([0.8, 0.75], costs, cost_threshold=0.01).route(["q"])[0].chosen[0].expert == "dear"
    decision = fixed_scores_router([0.8, 0.75], costs).route(["q"], cost_threshold=0.2)[0]
    assert decision.chosen[0].expert == "cheap" and "cost knob" in decision.explanation


def test_margin_keeps_the_fallback_unless_clearly_beaten():
    costs = {"best": 0.0, "other": 0.0}
    router = fixed_scores_router([0.6, 0.5], costs, margin=0.05)
    scores = np.array([[0.6, 0.63], [0.6, 0.7]])
    orders = router.rank(scores)
    assert [router.experts[o[0]] for o in orders] == ["best", "other"]


def test_calibration_hits_the_target_share_of_the_most_expensive_expert():
    rng = np.random.default_rng(0)
    scores = rng.random((1000, 3))
    costs = np.array([1.0, 5.0, 10.0])
    router = fixed_scores_router([0.1, 0.2, 0.3], {"a": 1.0, "b": 5.0, "c": 10.0})
    for target in (0.0, 0.1, 0.25):
        threshold = calibrate_cost_threshold(scores, costs, target)
        share = np.mean(router.rank(scores, cost_threshold=threshold)[:, 0] == 2)
        assert abs(share - target) <= 0.002, (target, share)
    at_zero = np.mean(scores.argmax(axis=1) == 2)
    assert calibrate_cost_threshold(scores, costs, 0.9) == 0.0 and at_zero < 0.9  # unreachable: most it can


def test_router_calibrate_sets_its_threshold():
    router = build_router("knn", embed=one_hot_embed, neighbours=3, costs={"a": 1.0, "b": 10.0, "c": 2.0}).fit(two_topics())
    texts = [f"{w} q{i}" for i in range(50) for w in ("alpha", "beta")]
    threshold, achieved = router.calibrate(texts, 0.0)
    assert achieved == 0.0 and router.cost_threshold == threshold > 0
    assert all(d.chosen[0].expert != "b" for d in router.route(texts))


# -- persistence -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(set(ROUTERS) - {"oracle", "dc"}))  # dc trains an encoder: test_router_families
def test_save_and_load_give_identical_decisions(name, tmp_path):
    from routers.base import EmbeddingRouter

    options = {"embed": one_hot_embed} if issubclass(ROUTERS[name], EmbeddingRouter) else {}
    router = build_router(name, costs={"a": 1.0, "b": 2.0, "c": 3.0}, cost_threshold=0.05, **options).fit(two_topics())
    texts = ["alpha new", "beta new", "delta new", "alpha beta"]
    router.save(tmp_path)
    loaded = load_router(tmp_path, **options)
    assert type(loaded) is type(router)
    assert [d.model_dump() for d in loaded.route(texts)] == [d.model_dump() for d in router.route(texts)]
    assert not list(tmp_path.glob("*.pkl"))


# -- offline metrics ------------------------------------------------------------------------------

def test_apgr_and_cpt_on_a_hand_computed_curve():
    # weak: cost 0, accuracy 0.5; strong: cost 1, accuracy 0.7. PGR rises linearly to 1 at cost
    # 0.5, then stays: APGR = 0.25 (triangle) + 0.5 (flat) = 0.75; PGR 0.5 at 0.25, 0.8 at 0.4.
    summary = curve_summary(np.array([0.0, 0.5, 1.0]), np.array([0.5, 0.7, 0.7]), weak=(0.0, 0.5), strong=(1.0, 0.7))
    assert summary.apgr == pytest.approx(0.75, abs=1e-3)
    assert summary.cpt50 == pytest.approx(0.25, abs=1e-3)
    assert summary.cpt80 == pytest.approx(0.4, abs=1e-3)


def test_curve_stays_flat_above_its_last_point_and_never_reaching_is_none():
    summary = curve_summary(np.array([0.0, 0.5]), np.array([0.5, 0.55]), weak=(0.0, 0.5), strong=(1.0, 0.7))
    assert summary.apgr == pytest.approx(0.125 / 2 + 0.125, abs=1e-3)  # 0.25 up to cost 0.5, then flat
    assert summary.cpt50 is None and summary.cpt80 is None


def test_paired_interval_holds_the_difference_and_narrows_with_more_questions():
    rng = np.random.default_rng(3)
    single = (rng.random(4000) < 0.7).astype(float)
    router = single.copy()
    router[rng.choice(np.flatnonzero(single == 0), 120, replace=False)] = 1.0  # the router fixes some of the single best's misses...
    router[rng.choice(np.flatnonzero(single == 1), 40, replace=False)] = 0.0  # ...and loses a few of its hits: +2 pp
    gain = router.mean() - single.mean()
    low, high = paired_interval(router, single)
    assert low < gain < high and 0 < low  # a real gain, shown to be one
    small_low, small_high = paired_interval(router[:400], single[:400])
    assert small_high - small_low > 2 * (high - low)  # a tenth of the questions: a wider interval
    assert paired_interval(router, single) == (low, high)  # seeded: a run regenerates it
    assert paired_interval(single, single) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_interval(router, single[:10])


def test_vote_replays_recorded_letters_and_falls_back_to_two_camps():
    orders = np.array([[0, 1, 2], [0, 1, 2]])
    weights = np.array([[0.9, 0.5, 0.5], [0.9, 0.5, 0.3]])
    outcomes = np.array([[0, 1, 1], [0, 1, 1]], dtype=float)
    preds = np.array([["A", "B", "B"], ["A", "B", None]], dtype=object)
    # Query 1: B has 1.0 against A's 0.9; query 2: B has 0.5 (one abstains) against 0.9.
    assert realised_accuracy(orders, 3, weights, outcomes, preds, ["B", "B"]).tolist() == [1.0, 0.0]
    # Without letters all wrong experts are assumed to agree: right 1.0 > 0.9, then 0.8 < 0.9.
    assert realised_accuracy(orders, 3, weights, outcomes).tolist() == [1.0, 0.0]
    assert realised_accuracy(orders, 1, weights, outcomes).tolist() == [0.0, 0.0]
    assert call_cost(orders, 2, np.array([1.0, 2.0, 4.0])).tolist() == [3.0, 3.0]


# -- the pipeline takes every router by policy name (real embedder, a small real slice) ----------

def test_pipeline_accepts_every_router_by_policy_name(tmp_path, monkeypatch):
    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path))
    from core.catalog import load_catalog
    from core.config import CoeConfig
    from core.types import Query
    from orchestrator.pipeline import Pipeline
    from orchestrator.policies import fit_policy

    catalog = load_catalog()
    policies = CoeConfig().policies
    assert {"knn", "coe", "symbolic", "glider"} <= set(policies)
    routers = {name: fit_policy(name, policy.model_copy(update={"examples_per_expert": 10}), catalog)
               for name, policy in policies.items()}
    pipeline = Pipeline(catalog, backend=None, routers=routers, default_policy="knn")
    question = ("Janet has 3 boxes with 12 pencils each. She gives away 7 pencils. How many pencils does she have left?")
    for policy, name in (("symbolic", "symbolic"), ("coe-coe", "coe"), ("coe-glider", "glider"), ("knn", "knn")):
        assert pipeline.resolve_policy(policy) == name
        [decision] = pipeline.route([Query.from_text(question, policy=policy)])
        assert decision.policy == name and decision.ranked
        assert routers[name].route([question])[0].chosen[0].expert == "smollm2-math", name
    assert routers["symbolic"].route([question])[0].aggregator == "vote"
