"""The pure core: types, planner and aggregators (no torch, no Ray, milliseconds)."""

import pytest
from pydantic import ValidationError

from core.errors import UnknownNameError
from core.types import Decision, ExpertAnswer, ExpertScore, PoolState, Query
from orchestrator import planner
from orchestrator.aggregators import aggregate


def decision(qid, *experts, k=1, aggregator="passthrough"):
    ranked = [ExpertScore(expert=e, score=1.0 - i / 10) for i, e in enumerate(experts)]
    return Decision(query_id=qid, policy="test", ranked=ranked, k=k, aggregator=aggregator)


def test_query_needs_user_text():
    with pytest.raises(ValidationError):
        Query(messages=[])
    with pytest.raises(ValidationError):
        Query.model_validate({"messages": [{"role": "system", "content": "be brief"}]})
    assert Query.from_text("hi").text == "hi"


def test_plan_groups_each_expert_once_resident_first():
    decisions = [decision("q1", "a"), decision("q2", "b"), decision("q3", "a"), decision("q4", "c", "a", k=2)]
    plan = planner.plan(decisions, PoolState(residence={"c": "device"}))
    assert [g.expert for g in plan.groups] == ["c", "a", "b"]  # resident first, then the biggest group
    assert {g.expert: g.query_ids for g in plan.groups} == {"c": ["q4"], "a": ["q1", "q3", "q4"], "b": ["q2"]}
    assert plan.loads == 2


def test_passthrough_and_weighted_vote():
    answers = [ExpertAnswer(expert="a", text="The answer is (B)."), ExpertAnswer(expert="b", text="so the answer is B"),
               ExpertAnswer(expert="c", text="The answer is (C).")]
    assert aggregate(decision("q", "a", "b", "c", k=3), answers[:1]) == "The answer is (B)."
    ranked = Decision(query_id="q", policy="t", k=3, aggregator="vote", ranked=[
        ExpertScore(expert="c", score=0.9), ExpertScore(expert="a", score=0.5), ExpertScore(expert="b", score=0.5)])
    assert aggregate(ranked, answers) == "The answer is (B)."  # 0.5 + 0.5 beats 0.9
    with pytest.raises(UnknownNameError):
        aggregate(decision("q", "a", aggregator="nope"), answers[:1])
