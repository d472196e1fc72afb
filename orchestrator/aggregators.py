"""Aggregators fuse the answers of a query's k experts into one; found by name in AGGREGATORS."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

from core.errors import unknown
from core.types import Decision, ExpertAnswer

Aggregator = Callable[[Decision, list[ExpertAnswer]], str]


def passthrough(decision: Decision, answers: list[ExpertAnswer]) -> str:
    """k = 1: the best-ranked expert's answer as it is."""
    return answers[0].text


def _final_answer(text: str) -> str:
    """What a vote compares: the text after the last "answer is", else the last line, normalised."""
    tail = re.findall(r"answer is[:\s]*(.+)", text, flags=re.IGNORECASE)
    core = tail[-1] if tail else (text.strip().splitlines() or [""])[-1]
    return re.sub(r"[\s.()]+", " ", core).strip().lower()


def weighted_vote(decision: Decision, answers: list[ExpertAnswer]) -> str:
    """Closed-form answers: the final answer with the most router score behind it wins; the answer
    text returned is that of its best-ranked supporter."""
    weight = {s.expert: s.score for s in decision.ranked}
    support: dict[str, float] = defaultdict(float)
    for answer in answers:
        support[_final_answer(answer.text)] += max(weight.get(answer.expert, 0.0), 1e-6)
    winner = max(support, key=support.get)
    return next(a.text for a in answers if _final_answer(a.text) == winner)


AGGREGATORS: dict[str, Aggregator] = {"passthrough": passthrough, "vote": weighted_vote}


def aggregate(decision: Decision, answers: list[ExpertAnswer]) -> str:
    if decision.aggregator not in AGGREGATORS:
        raise unknown("aggregator", decision.aggregator, AGGREGATORS)
    return AGGREGATORS[decision.aggregator](decision, answers)
