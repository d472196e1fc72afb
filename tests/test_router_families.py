"""The cluster, mf, dc and best routers, and what every router now shares: bad fitting data,
conversation history, the load penalty and the cascade option."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from core.types import Decision
from evals.metrics import cascade_accuracy, cascade_calls
from routers import build_router, load_router
from routers.base import DEFAULT_LOAD_PENALTY, OutcomeData, RoutingDataWarning, mix_history
from routers.embedder import QUANTIZED_ONNX
from tests.test_routers_outcomes import two_topics
from tests.test_routing import one_hot_embed

FAST_FAMILIES = {"cluster": {"clusters": 2}, "mf": {}, "best": {"member_options": {"cluster": {"clusters": 2}}}}
ALL_EMBEDDING = ["knn", "coe", "symbolic", "glider", "cluster", "mf", "best"]


def quiet_fit(name, data, **options):
    """Fit on data the test makes deliberately small (the fit warns about it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutingDataWarning)
        return build_router(name, embed=one_hot_embed, **options).fit(data)


@pytest.mark.parametrize("name", sorted(FAST_FAMILIES))
def test_new_families_send_each_topic_to_its_specialist(name):
    router = quiet_fit(name, two_topics(rows_per_topic=30), **FAST_FAMILIES[name])
    alpha, beta = router.route(["alpha new", "beta new"])
    assert alpha.chosen[0].expert == "a", alpha
    assert beta.chosen[0].expert == "b", beta


@pytest.mark.parametrize("name", sorted(FAST_FAMILIES))
def test_new_families_save_and_load_to_identical_decisions(name, tmp_path):
    router = quiet_fit(name, two_topics(rows_per_topic=30), costs={"a": 1.0, "b": 2.0, "c": 3.0}, **FAST_FAMILIES[name])
    texts = ["alpha new", "beta new", "delta new", "alpha beta"]
    router.save(tmp_path)
    loaded = load_router(tmp_path, embed=one_hot_embed)
    assert type(loaded) is type(router)
    assert [d.model_dump() for d in loaded.route(texts)] == [d.model_dump() for d in router.route(texts)]


def test_cluster_alpha_below_one_trades_accuracy_for_cost():
    # Both experts are right on alpha; `c` (cheap) a little less often. Pure accuracy picks a; a
    # low alpha weighs the cost in and picks the cheap one.
    texts = [f"alpha q{i}" for i in range(20)]
    outcomes = [[1, 0, 1 if i % 5 else 0] for i in range(20)]
    data = OutcomeData(texts=texts, experts=["a", "b", "c"], outcomes=outcomes)
    costs = {"a": 100.0, "b": 50.0, "c": 1.0}
    assert quiet_fit("cluster", data, clusters=1, costs=costs).route(["alpha x"])[0].chosen[0].expert == "a"
    assert quiet_fit("cluster", data, clusters=1, costs=costs, alpha=0.3).route(["alpha x"])[0].chosen[0].expert == "c"


def test_cluster_smoothing_keeps_a_lucky_small_cluster_from_crowning_an_expert():
    # Cluster "beta" has 2 queries where the weak expert happened to be right and the strong one not.
    texts = [f"alpha q{i}" for i in range(40)] + ["beta q1", "beta q2"]
    outcomes = [[1, 0]] * 30 + [[1, 1]] * 10 + [[0, 1], [0, 1]]
    data = OutcomeData(texts=texts, experts=["strong", "weak"], outcomes=outcomes)
    assert quiet_fit("cluster", data, clusters=2, smoothing=10.0).route(["beta q3"])[0].chosen[0].expert == "strong"
    assert quiet_fit("cluster", data, clusters=2, smoothing=0.0).route(["beta q3"])[0].chosen[0].expert == "weak"


# -- bad input: the fit warns naming what it left out and routing falls back to the single best ---

def test_an_expert_missing_for_some_queries_is_named_and_its_known_rows_still_count():
    data = two_topics(rows_per_topic=30)
    data.outcomes[::2, 1] = np.nan  # b did not answer half the questions
    with pytest.warns(RoutingDataWarning, match=r"'b' has no outcome on 30 of 60"):
        router = build_router("knn", embed=one_hot_embed, margin=0.0).fit(data)
    assert router.route(["beta new"])[0].chosen[0].expert == "b"


@pytest.mark.parametrize("name", ALL_EMBEDDING + ["single_best"])
def test_ties_everywhere_warn_and_route_to_the_single_best(name):
    texts = [f"{w} q{i}" for i in range(15) for w in ("alpha", "beta")]
    data = OutcomeData(texts=texts, experts=["x", "y", "z"], outcomes=[[1, 1, 1]] * 15 + [[0, 0, 0]] * 15,
                       categories=[t.split()[0] for t in texts], ids=[str(i) for i in range(30)])
    options = {"embed": one_hot_embed} if name != "single_best" else {}
    if name == "cluster":
        options["clusters"] = 2
    with pytest.warns(RoutingDataWarning, match="same outcome on every fitting query"):
        router = build_router(name, fallback_expert="y", **options).fit(data)
    chosen = {d.chosen[0].expert for d in router.route(["alpha new", "beta new", "gamma new", "delta new"])}
    assert chosen == {"y"}


@pytest.mark.parametrize("name", ALL_EMBEDDING)
def test_a_model_with_no_correct_answer_is_left_out(name):
    data = two_topics(rows_per_topic=30)
    data.outcomes[:, 2] = 0.0
    options = {"cluster": {"clusters": 2}, "best": {"member_options": {"cluster": {"clusters": 2}}}}.get(name, {})
    with pytest.warns(RoutingDataWarning, match="'c' is never right"):
        router = build_router(name, embed=one_hot_embed, **options).fit(data)
    assert router.left_out == ["c"]
    decisions = router.route(["alpha new", "beta new", "gamma new", "delta new"])
    assert all(d.chosen[0].expert != "c" for d in decisions)
    assert all(s.score <= 0 for d in decisions for s in d.ranked if s.expert == "c")


def test_an_expert_with_no_outcome_at_all_is_left_out_and_never_chosen():
    data = two_topics(rows_per_topic=30)
    data.outcomes[:, 0] = np.nan
    with pytest.warns(RoutingDataWarning, match="'a' has no outcome on any"):
        router = build_router("knn", embed=one_hot_embed).fit(data)
    assert all(d.chosen[0].expert != "a" for d in router.route(["alpha new", "beta new"]))


def test_a_cluster_with_no_training_queries_is_named_and_its_queries_fall_back():
    # Ten identical questions cannot fill five clusters: the empty ones are reported, and a query
    # nearest to nothing with data still gets the (only) populated cluster's ranking.
    data = OutcomeData(texts=["alpha q"] * 10, experts=["a", "b"], outcomes=[[1, 0]] * 10)
    with pytest.warns(RoutingDataWarning, match=r"clusters have no training queries"):
        router = build_router("cluster", embed=one_hot_embed, clusters=5).fit(data)
    assert (router.cluster_sizes == 0).sum() >= 1
    assert [d.chosen[0].expert for d in router.route(["beta new", "alpha new"])] == ["a", "a"]


# -- conversations ----------------------------------------------------------------------------------

def test_history_mixes_earlier_turns_with_a_decaying_weight():
    vectors = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    turns = [np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=np.float32)]  # oldest first
    mixed = mix_history(vectors, turns, 0.5)[0]
    expected = np.array([1.0, 0.5, 0.25]) / np.linalg.norm([1.0, 0.5, 0.25])
    assert np.allclose(mixed, expected, atol=1e-6)
    assert np.allclose(mix_history(vectors, turns, 0.0), vectors)


@pytest.mark.parametrize("name", ["knn", "cluster", "mf"])
def test_routers_route_a_vague_follow_up_by_the_conversation(name):
    options = {"cluster": {"clusters": 2}}.get(name, {})
    router = quiet_fit(name, two_topics(rows_per_topic=30), history_weight=1.0, margin=0.0, **options)
    [alone] = router.route(["gamma and why"])
    [with_history] = router.route(["gamma and why"], history=[["beta first question"]])
    assert with_history.chosen[0].expert == "b"
    assert router.route(["gamma and why"], history=[[]])[0].chosen[0].expert == alone.chosen[0].expert


# -- residency and cascades ---------------------------------------------------------------------------

def fixed(scores, **options):
    data = OutcomeData(texts=["x"], experts=["far", "resident", "other"], outcomes=[scores])
    return build_router("single_best", **options).fit(data)


def test_load_penalty_lets_a_resident_expert_within_the_margin_win():
    load = np.array([30.0, 0.0, 5.0])
    assert fixed([0.80, 0.78, 0.5], load_penalty=0).route(["q"], load_seconds=load)[0].chosen[0].expert == "far"  # quality only
    within, beyond = 0.80 - DEFAULT_LOAD_PENALTY / 2, 0.80 - DEFAULT_LOAD_PENALTY - 0.02
    # the default weighs loads
    assert fixed([0.80, within, 0.5]).route(["q"], load_seconds=load)[0].chosen[0].expert == "resident"
    assert fixed([0.80, beyond, 0.5]).route(["q"], load_seconds=load)[0].chosen[0].expert == "far"  # beyond the default margin
    decision = fixed([0.80, 0.78, 0.5], load_penalty=0.05).route(["q"], load_seconds=load)[0]
    assert decision.chosen[0].expert == "resident" and "load penalty" in decision.explanation
    assert fixed([0.80, 0.70, 0.5], load_penalty=0.05).route(["q"], load_seconds=load)[0].chosen[0].expert == "far"
    assert fixed([0.80, 0.78, 0.5], load_penalty=0.05).route(["q"])[0].chosen[0].expert == "far"  # no loads given


def test_cascade_option_travels_in_the_decision_and_saves(tmp_path):
    router = build_router("knn", embed=one_hot_embed, k=3, cascade=0.7).fit(two_topics())
    [decision] = router.route(["alpha new"])
    assert isinstance(decision, Decision) and decision.cascade == 0.7 and decision.k == 3
    router.save(tmp_path)
    assert load_router(tmp_path, embed=one_hot_embed).route(["alpha new"])[0].cascade == 0.7


def test_cascade_calls_the_next_expert_only_while_predicted_success_is_low():
    scores = np.array([[0.9, 0.5, 0.1], [0.4, 0.3, 0.2], [0.5, 0.8, 0.1]])
    orders = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    assert cascade_calls(orders, 3, scores, 0.6).tolist() == [1, 3, 2]
    outcomes = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0]], dtype=float)
    correct, calls, cost = cascade_accuracy(orders, 3, scores, 0.6, outcomes, np.array([1.0, 2.0, 4.0]))
    # Row 2: the right experts (0.3 + 0.2) outvote the wrong one (0.4); row 3: 0.8 (right) > 0.5.
    assert correct.tolist() == [1.0, 1.0, 1.0] and calls.tolist() == [1, 3, 2] and cost.tolist() == [1.0, 7.0, 3.0]


# -- served routers never import torch ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mf", "cluster", "best"])
def test_a_saved_router_routes_without_importing_torch(name, tmp_path):
    router = quiet_fit(name, two_topics(rows_per_topic=30), **FAST_FAMILIES[name])
    router.save(tmp_path)
    vectors = one_hot_embed(["alpha new", "beta new"]).tolist()
    script = (
        "import json, sys, numpy as np\n"
        "from routers import load_router\n"
        "def one_hot_embed(texts): raise AssertionError('the embeddings are given')\n"  # the embedder it was fitted with, by name
        f"router = load_router({str(tmp_path)!r}, embed=one_hot_embed)\n"
        f"decisions = router.route(['alpha new', 'beta new'], embeddings=np.array({vectors}, dtype=np.float32))\n"
        "print(json.dumps({'chosen': [d.chosen[0].expert for d in decisions], 'torch': 'torch' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"chosen": ["a", "b"], "torch": False}


# -- RouterDC: a real fine-tuned encoder (minutes of CPU: slow) -----------------------------------------

@pytest.mark.slow
def test_dc_fine_tunes_an_int8_encoder_that_routes_saves_and_serves_without_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COE_QUIET", "1")
    texts = [f"what is the derivative of x^{i} + {i}x" for i in range(16)] + [f"who ruled france in the year {1600 + 7 * i}" for i in range(16)]
    data = OutcomeData(texts=texts, experts=["math", "history", "general"], outcomes=[[1, 0, 0]] * 16 + [[0, 1, 0]] * 16,
                       ids=[str(i) for i in range(32)])
    router = build_router("dc", max_steps=12, batch_size=16, query_clusters=2).fit(data)
    questions = ["compute the derivative of sin x", "which king ruled england in 1700"]
    assert [d.chosen[0].expert for d in router.route(questions)] == ["math", "history"]
    folder = tmp_path / "router"
    router.save(folder)
    assert (folder / "encoder" / QUANTIZED_ONNX).is_file()
    knn = build_router("knn", encoder=str(folder / "encoder"), neighbours=5).fit(data)
    assert [d.chosen[0].expert for d in knn.route(questions)] == ["math", "history"]
    script = (
        "import json, sys\n"
        "from routers import load_router\n"
        f"router = load_router({str(folder)!r})\n"
        f"decisions = router.route({questions!r})\n"
        "print(json.dumps({'chosen': [d.chosen[0].expert for d in decisions], 'torch': 'torch' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"chosen": ["math", "history"], "torch": False}


# -- servable by name: fitted as a policy on the embedded catalog's examples (real embedder) -----------

def test_new_families_serve_as_policies_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path))
    from core.catalog import load_catalog
    from core.config import PolicyConfig
    from orchestrator.policies import fit_policy

    catalog = load_catalog()
    question = "Janet has 3 boxes with 12 pencils each. She gives away 7 pencils. How many pencils does she have left?"
    for name, options in (("cluster", {"clusters": 8}), ("mf", {}), ("best", {"member_options": {"cluster": {"clusters": 8}}})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoutingDataWarning)
            router = fit_policy(name, PolicyConfig(router=name, options=options, examples_per_expert=20), catalog)
        assert router.route([question])[0].chosen[0].expert == "smollm2-math", name
        again = fit_policy(name, PolicyConfig(router=name, options=options, examples_per_expert=20), catalog)  # from the cache
        assert again.route([question])[0].model_dump() == router.route([question])[0].model_dump()
