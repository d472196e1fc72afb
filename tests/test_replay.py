"""Replay experts on a tiny recorded trace: answer semantics, simulated tier loading, and the
whole pipeline (router, planner, loading, aggregation) over them, with reports and comparisons."""

import json

import pytest

from core.data import load_benchmark
from core.errors import CoeError
from core.prompts import user_prompt
from core.types import GenerationParams, GenerationRequest, Message
from evals.outcomes import DATASETS, DatasetSpec, load_outcomes
from experts.backends import build_backend
from experts.backends.replay import fixed_wrong_choice

MODELS = {"Model-A": (40.0, 40.0), "model-b": (7.0, 7.0), "model-c": (10.0, 2.0)}  # (total, active) billions
GB = 1e9


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    """12 real MMLU-Pro questions with made-up recordings of three models:
    Model-A: recorded letters, right on rows 0-5, wrong on 6-11;
    model-b: no letters; outcome correct on even rows, wrong on odd ones;
    model-c: no letters; did not answer rows 0-3, correct on 4-11."""
    items = list(load_benchmark("mmlu_pro_test")[:12])
    outcomes, preds = [], []
    for row, item in enumerate(items):
        a = item.answer if row < 6 else fixed_wrong_choice(item.answer)
        outcome = {"Model-A": int(row < 6), "model-b": int(row % 2 == 0)}
        if row >= 4:
            outcome["model-c"] = 1
        outcomes.append({"id": item.id, "category": item.category, "question": item.question, "choices": item.choices,
                         "answer": item.answer, "outcomes": outcome})
        preds.append({"id": item.id, "preds": {"Model-A": a, "model-b": None}})
    for name, rows in (("outcomes", outcomes), ("preds", preds)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "models.json").write_text(json.dumps({m: {"params_b": t, "active_params_b": a} for m, (t, a) in MODELS.items()}))
    monkeypatch.setitem(DATASETS, "tiny", DatasetSpec((str(tmp_path / "outcomes.jsonl"),), preds=str(tmp_path / "preds.jsonl"),
                                                      models=str(tmp_path / "models.json")))
    return items


# FP8: model-a 40 GB, model-b 7 GB, model-c 10 GB.
TIERS = {"device_bytes": int(45 * GB), "host_bytes": int(60 * GB), "host_to_device_gbps": 10.0, "disk_to_host_gbps": 1.0}


def make_catalog():
    from evals.replay import replay_catalog

    return replay_catalog("tiny", load_outcomes("tiny"), default_model="Model-A")


def tiny_traces():
    from evals.replay import load_trace

    return {"tiny": load_trace("tiny")}


def ask(backend, expert, item, query_id=None):
    request = GenerationRequest(expert=expert, messages=[Message(role="user", content=user_prompt(item))],
                                params=GenerationParams(max_tokens=8), query_id=query_id)
    return backend.generate([request])[0].text


def test_replay_answers_recorded_letter_else_gold_if_correct_else_fixed_wrong(tiny):
    catalog = make_catalog()
    assert catalog.names == ["model-a", "model-b", "model-c"]  # catalog-safe names
    backend = build_backend("replay", catalog, traces=tiny_traces())  # registered by name
    for row, item in enumerate(tiny):
        wrong = f"The answer is ({fixed_wrong_choice(item.answer)})."
        right = f"The answer is ({item.answer})."
        assert ask(backend, "model-a", item) == (right if row < 6 else wrong)
        assert ask(backend, "model-b", item) == (right if row % 2 == 0 else wrong)
        assert ask(backend, "model-c", item, query_id=item.id) == (wrong if row < 4 else right)  # no answer recorded: wrong
    with pytest.raises(CoeError, match="no recorded answer"):
        ask(backend, "model-a", load_benchmark("mmlu_pro_test")[100])


def test_replay_finds_questions_by_id_before_text(tiny):
    backend = build_backend("replay", make_catalog(), traces=tiny_traces())
    # Row 7's id with row 0's text: the id wins (MMLU-Pro repeats some questions with other recordings).
    request = GenerationRequest(expert="model-a", messages=[Message(role="user", content=user_prompt(tiny[0]))],
                                params=GenerationParams(), query_id=tiny[7].id)
    assert backend.generate([request])[0].text == f"The answer is ({fixed_wrong_choice(tiny[7].answer)})."


def test_replay_experts_have_the_real_models_sizes(tiny):
    catalog = make_catalog()
    assert catalog.get("model-c").size_bytes == 10 * GB  # 10B parameters in FP8
    assert catalog.get("model-c").params == 2 * GB  # active parameters per token
    assert catalog.default_expert == "model-a"


def test_replay_loads_cost_bytes_over_tier_bandwidths_in_the_pool(tiny):
    from experts.pool import TieredPool

    backend = build_backend("replay", make_catalog(), traces=tiny_traces(), **TIERS)
    assert isinstance(backend.pool, TieredPool) and backend.resident() == {}
    assert backend.load("model-b") == pytest.approx(7 / 1 + 7 / 10)  # cold: disk -> host -> device
    assert backend.load("model-b") == 0.0 and backend.resident() == {"model-b": "device"}
    # 47 GB > 45: model-b is offloaded to host memory over the same link (0.7 s), then model-a comes up.
    assert backend.load("model-a") == pytest.approx(0.7 + 40 + 4)
    assert backend.resident() == {"model-a": "device", "model-b": "host"}
    assert backend.load("model-b") == pytest.approx(4 + 0.7)  # model-a down to host, model-b up from it
    stats = backend.pool.stats()
    assert stats.loads == 3 and stats.load_seconds == pytest.approx(7.7 + 44 + 0.7)  # upward moves
    assert sum(stats.seconds.values()) == pytest.approx(7.7 + 44.7 + 4.7)  # every move
    backend.reset()
    assert backend.resident() == {} and backend.pool.stats().loads == 0


def test_an_expert_larger_than_the_device_is_a_clear_error(tiny):
    from core.errors import PoolCapacityError

    backend = build_backend("replay", make_catalog(), traces=tiny_traces(), **{**TIERS, "device_bytes": int(20 * GB)})
    with pytest.raises(PoolCapacityError, match="budget"):
        backend.load("model-a")


def tiny_pipeline(policy: str):
    from evals.replay import renamed
    from orchestrator.pipeline import Pipeline
    from routers import build_router

    data = load_outcomes("tiny")
    catalog = make_catalog()
    costs = {"model-a": 40.0, "model-b": 7.0, "model-c": 2.0}
    k = 2 if policy == "vote" else 1
    router = build_router("oracle" if policy != "single_best" else "single_best", costs=costs, k=k)
    router.fit(renamed(data.data))
    if router.name == "oracle":
        router.reveal(renamed(data.data))
    return Pipeline(catalog, build_backend("replay", catalog, traces=tiny_traces(), **TIERS), {policy: router}, policy, prefetch=False)


def test_pipeline_over_replay_plans_one_load_per_expert_per_batch(tiny):
    from evals.runner import PipelineTarget

    ids = {i.id for i in tiny}
    planned = tiny_pipeline("oracle")
    results = planned.run([_query(i, "oracle") for i in tiny])
    chosen = [r.experts[0] for r in results]
    # The oracle calls the cheapest expert that is right: model-c from row 4 on, model-b on rows 0 and 2, else model-a.
    assert chosen == ["model-b", "model-a", "model-b", "model-a"] + ["model-c"] * 8
    stats = planned.backend.pool.stats()
    assert stats.loads == 3  # each expert once for the batch
    assert stats.load_seconds == pytest.approx((10 + 1) + (7 + 0.7) + (40 + 4))  # plus offloading c and b for a
    assert results[0].timings["load_transfer"] == pytest.approx(sum(stats.seconds.values())) == pytest.approx(62.7 + 1 + 0.7)

    naive = tiny_pipeline("oracle")
    for item in tiny:
        naive.run([_query(item, "oracle")])
    # One request at a time (b, a, b, a, c...): model-a and model-b do not fit together and take turns.
    naive_stats = naive.backend.pool.stats()
    assert naive_stats.loads > 3 and sum(naive_stats.seconds.values()) > sum(stats.seconds.values()) + 1

    target = PipelineTarget(tiny_pipeline("oracle"))
    assert target.active_params(["model-a", "model-c"]) == 42e9
    assert [r.query_id for r in results] == [i.id for i in tiny] and len(ids) == len(tiny)  # one answer per query, in order


def _query(item, policy):
    from core.types import Query

    return Query(id=item.id, messages=[Message(role="user", content=user_prompt(item))], policy=policy,
                 params=GenerationParams(max_tokens=8))


def test_replay_runs_report_and_compare(tiny, tmp_path):
    from evals.report import compare
    from evals.runner import PipelineTarget, RunConfig, run_benchmark

    ids = {i.id for i in tiny}
    runs = {}
    for policy in ("oracle", "single_best", "vote"):
        config = RunConfig(benchmark="mmlu_pro", policy=policy, replay="tiny", batch_size=5)
        runs[policy] = run_benchmark(config, tmp_path / policy, target=PipelineTarget(tiny_pipeline(policy)), only_ids=ids,
                                     progress=False)
    oracle, single, vote = runs["oracle"], runs["single_best"], runs["vote"]
    assert oracle["items"] == single["items"] == 12
    assert oracle["accuracy"] == pytest.approx(1.0)  # some model is right on every row
    assert single["accuracy"] == pytest.approx(8 / 12)  # the best on the data: model-c, right on rows 4-11
    assert single["expert_calls"] == {"model-c": 12} and single["mean_active_params"] == pytest.approx(2e9)
    assert oracle["expert_calls"] == {"model-b": 2, "model-a": 2, "model-c": 8}
    assert oracle["mean_active_params"] == pytest.approx((2 * 7 + 2 * 40 + 8 * 2) / 12 * 1e9)
    # k = 2 with a weighted vote: the two best-scored experts; both right, or the better-ranked one decides.
    assert vote["mean_active_params"] > oracle["mean_active_params"] and sum(vote["expert_calls"].values()) == 24
    assert vote["accuracy"] == pytest.approx(1.0)  # a right expert (score 1) outvotes a wrong one (score 0)
    categories = {}
    for item in tiny:
        categories[item.category] = categories.get(item.category, 0) + 1
    assert {c: v["items"] for c, v in single["categories"].items()} == categories
    assert single["load_seconds_simulated"] and single["load_seconds"] == pytest.approx(10 + 1)  # loaded once, stays for 3 batches
    for policy in runs:
        assert {p.name for p in (tmp_path / policy).iterdir()} >= {"results.jsonl", "run.json", "summary.json", "report.md",
                                                                   "category_accuracy.png"}
    assert "| 12 | 12 | 0.6667 |" in (tmp_path / "single_best" / "report.md").read_text()

    summaries, table = compare([tmp_path / "oracle", tmp_path / "single_best"], tmp_path / "cmp")
    assert [s["accuracy"] for s in summaries] == pytest.approx([1.0, 8 / 12])
    assert "| oracle | mmlu_pro | oracle | replay | 12 | 1.0000 |" in table and "| single_best |" in table
    assert {"compare.md", "compare.json", "compare_categories.png", "compare_cost.png"} <= {p.name for p in (tmp_path / "cmp").iterdir()}
    assert (tmp_path / "cmp" / "compare_cost.png").stat().st_size > 10_000


class CountingTarget:
    """A pipeline target that counts the queries it answers."""

    def __init__(self, target):
        self.target, self.backend, self.answered = target, target.backend, []

    def answer(self, queries):
        self.answered += [q.id for q in queries]
        return self.target.answer(queries)

    def active_params(self, experts):
        return self.target.active_params(experts)


def test_a_run_resumes_without_redoing_or_losing_items(tiny, tmp_path):
    from evals.runner import RESULTS_FILE, PipelineTarget, RunConfig, run_benchmark

    ids = {i.id for i in tiny}
    target = CountingTarget(PipelineTarget(tiny_pipeline("oracle")))
    first = RunConfig(benchmark="mmlu_pro", policy="oracle", replay="tiny", batch_size=2, limit=5)
    assert run_benchmark(first, tmp_path, target=target, only_ids=ids, progress=False)["items"] == 5
    results = tmp_path / RESULTS_FILE
    done = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    # A kill in the middle of a write leaves half a line: it is dropped, and its item answered again.
    with results.open("a") as f:
        f.write('{"id": "mmlu_pro/999", "categ')
    target.answered.clear()
    summary = run_benchmark(first.model_copy(update={"limit": None}), tmp_path, target=target, only_ids=ids, progress=False)
    assert summary["items"] == 12 and summary["accuracy"] == pytest.approx(1.0)
    assert sorted(target.answered) == sorted(ids - set(done))  # only what was missing
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["id"] for r in lines[:5]] == done and sorted(r["id"] for r in lines) == sorted(ids)

    with pytest.raises(CoeError, match="different run"):
        run_benchmark(first.model_copy(update={"policy": "single_best"}), tmp_path, target=target, only_ids=ids, progress=False)
