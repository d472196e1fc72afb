"""Routing: the kNN router's logic on synthetic data, and the real router on held-out questions."""

import numpy as np
import pytest

from core.prompts import user_prompt
from experts.tasks import TASKS
from routers import OutcomeData, build_router
from routers.knn import KNNRouter

EXPECTED = {"math": "smollm2-math", "science": "smollm2-science", "medicine": "smollm2-medicine",
            "logic": "smollm2-logic", "general": "smollm2-135m"}


def one_hot_embed(texts):
    """A stand-in embedding where texts starting with the same word are identical."""
    vocab = ["alpha", "beta", "gamma"]
    vectors = np.zeros((len(texts), 4), dtype=np.float32)
    for i, t in enumerate(texts):
        word = t.split()[0]
        vectors[i, vocab.index(word) if word in vocab else 3] = 1.0
    return vectors


def test_knn_votes_for_the_expert_of_the_nearest_examples_and_falls_back():
    data = OutcomeData(texts=["alpha one", "alpha two", "beta one", "beta two"], experts=["a", "b"],
                       outcomes=[[1, 0], [1, 0], [0, 1], [0, 1]])
    router = KNNRouter(neighbours=2, min_similarity=0.5, fallback_expert="general", embed=one_hot_embed).fit(data)
    alpha, beta, other = router.route(["alpha three", "beta three", "delta"], ["q1", "q2", "q3"])
    assert alpha.chosen[0].expert == "a" and beta.chosen[0].expert == "b"
    assert other.chosen[0].expert == "general" and "no specialist fits" in other.explanation


def test_knn_predicts_success_from_recorded_outcomes_and_saves(tmp_path):
    # Expert b is right on every beta question, a on none of them; missing outcomes (NaN) are ignored.
    data = OutcomeData(texts=["beta 1", "beta 2", "beta 3"], experts=["a", "b"],
                       outcomes=[[0, 1], [np.nan, 1], [0, 1]])
    router = KNNRouter(neighbours=3, embed=one_hot_embed).fit(data)
    scores, _ = router.scores(["beta 4"])
    assert scores.tolist() == [[0.0, 1.0]]
    router.save(tmp_path)
    loaded = KNNRouter.load(tmp_path, embed=one_hot_embed)
    assert loaded.route(["beta 5"])[0].chosen[0].expert == "b"
    assert not list(tmp_path.glob("*.pkl"))


def test_unknown_router_name():
    from core.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="knn"):
        build_router("nope")


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_real_router_sends_heldout_questions_to_their_expert(pipeline, task):
    items = TASKS[task].heldout()[:40]
    router = pipeline.routers["knn"]
    decisions = router.route([user_prompt(i) for i in items])
    hits = sum(d.chosen[0].expert == EXPECTED[task] for d in decisions)
    assert hits / len(items) >= (0.85 if task == "general" else 0.9), f"{task}: {hits}/{len(items)} routed to {EXPECTED[task]}"


def test_general_questions_go_to_the_general_expert(pipeline):
    decisions = pipeline.routers["knn"].route(["What is the capital of France?", "Who wrote Hamlet?", "Give me tips for a job interview."])
    assert [d.chosen[0].expert for d in decisions] == ["smollm2-135m"] * 3


def test_queries_arriving_one_by_one_get_what_a_batch_gets(pipeline):
    """Queries arriving one by one from another event loop (a server's path: `arun` per query,
    concurrent ones share backend batches) are routed and answered like `run` on them together."""
    import asyncio

    from core.types import GenerationParams, Query

    queries = [Query.from_text(t, params=GenerationParams(max_tokens=8))
               for t in ("What is 17 * 23?", "What is the capital of France?", "Which nerve supplies the deltoid?")]
    together = pipeline.run(queries)

    async def one_by_one():
        return [r for rs in await asyncio.gather(*(pipeline.arun([q]) for q in queries)) for r in rs]

    arrived = asyncio.run(one_by_one())
    assert [r.experts for r in arrived] == [r.experts for r in together]
    assert [r.text for r in arrived] == [r.text for r in together]
    assert all(r.usage.completion_tokens > 0 and r.timings["total"] > 0 for r in arrived)
