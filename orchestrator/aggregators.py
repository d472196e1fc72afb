"""Aggregators fuse the answers of a query's k experts into one; found by name.

- `passthrough` (k = 1) and `vote` (closed-form answers) are functions of the answers.
- `synthesis` (Mixture-of-Agents / Symbolic-MoE): an aggregator expert reads the k answers and
  writes the final one. It is a generation, so the engine runs it as one more round of its loop
  (its tokens stream like any answer's); here is only the prompt it is given.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

from core.errors import unknown
from core.types import Decision, ExpertAnswer, Message, Query

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
    """Closed-form answers: the final answer with the most router score (predicted success)
    behind it wins; the answer text returned is that of its best-ranked supporter."""
    weight = {s.expert: s.score for s in decision.ranked}
    support: dict[str, float] = defaultdict(float)
    for answer in answers:
        support[_final_answer(answer.text)] += max(weight.get(answer.expert, 0.0), 1e-6)
    winner = max(support, key=support.get)
    return next(a.text for a in answers if _final_answer(a.text) == winner)


AGGREGATORS: dict[str, Aggregator] = {"passthrough": passthrough, "vote": weighted_vote}
GENERATING = ("synthesis",)  # aggregators that are a generation by the aggregator expert

SYNTHESIS_PROMPT = (
    "You have been given answers from several models to the user's last message. Some may be wrong. "
    "Weigh them critically and write one correct, complete answer of your own; end with the final "
    "answer if the question has one.")


def generates(name: str) -> bool:
    if name not in AGGREGATORS and name not in GENERATING:
        raise unknown("aggregator", name, [*AGGREGATORS, *GENERATING])
    return name in GENERATING


def aggregate(decision: Decision, answers: list[ExpertAnswer]) -> str:
    if decision.aggregator not in AGGREGATORS:
        raise unknown("aggregator", decision.aggregator, AGGREGATORS)
    return AGGREGATORS[decision.aggregator](decision, answers)


def synthesis_messages(query: Query, answers: list[ExpertAnswer]) -> list[Message]:
    """The aggregator expert's conversation: the query's, its last user message followed by the answers."""
    listed = "\n\n".join(f"Answer {i} ({a.expert}):\n{a.text}" for i, a in enumerate(answers, 1))
    last = max(i for i, m in enumerate(query.messages) if m.role == "user")
    ask = Message(role="user", content=f"{query.messages[last].content}\n\n{SYNTHESIS_PROMPT}\n\n{listed}")
    return [*query.messages[:last], ask]
