"""Offline routing metrics on recorded outcomes: realised accuracy and cost of a routing, and the
cost-quality curve summaries of RouteLLM (APGR, CPT). Pure numpy.

Accuracy of a query routed to k experts:
- k = 1: the chosen expert's recorded outcome.
- k > 1 with recorded answers (MMLU-Pro letters): the weighted vote of `orchestrator.aggregators`
  replayed on the letters: each chosen expert adds its router score to its letter, experts
  without an answer abstain, ties go to the best-ranked supporter; correct when the winner is gold.
- k > 1 without recorded answers: the worst case for a vote, where every wrong expert gave the
  same wrong answer: correct when the router weight of the right experts beats that of the wrong
  ones (a tie goes to the best-ranked expert). Fractional outcomes count as fractional weight.

Cost of a query = the sum of the chosen experts' costs.

RouteLLM (lm-sys/RouteLLM, routellm/evals/evaluate.py) compares a router with the strong model
and the weak model it routes between: on the curve of accuracy against the share of calls to the
strong model, PGR = (accuracy - weak) / (strong - weak); APGR is the area under PGR over the call
share from 0 to 100%; CPT(x%) is the call share needed to reach PGR x%. With many models the
x-axis generalises to normalised cost, (cost - weak cost) / (strong cost - weak cost), with
strong = the single best expert on the fitting data and weak = the cheapest expert; with two
models it is exactly RouteLLM's call share.

How much of a difference is the test split's luck: `paired_interval`, a percentile bootstrap over
the test questions, paired (both sides resampled on the same questions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_VOTE_WEIGHT = 1e-6  # as in orchestrator.aggregators.weighted_vote
BOOTSTRAP_RESAMPLES = 2000


def paired_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The `level` interval of mean(a) - mean(b) over the same questions (per-question scores, e.g.
    a router's and the single best's correctness): percentile bootstrap, paired, seeded so a run
    regenerates it."""
    from scipy.stats import bootstrap

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"paired scores of different lengths: {len(a)} and {len(b)}")
    if len(a) < 2 or np.all(a - b == (a - b)[0]):  # no spread to resample (scipy would warn and return nan)
        difference = float(np.mean(a - b)) if len(a) else 0.0
        return difference, difference
    result = bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                       n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=level, method="percentile", random_state=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def realised_accuracy(orders: np.ndarray, k: int, weights: np.ndarray, outcomes: np.ndarray,
                      preds: np.ndarray | None = None, gold: list[str] | None = None) -> np.ndarray:
    """Per-query correctness (in [0, 1]) of routing each query to the first k experts of its order."""
    rows = np.arange(len(orders))
    if k == 1:
        return np.nan_to_num(outcomes[rows, orders[:, 0]])
    chosen = orders[:, :k]
    w = np.maximum(np.take_along_axis(weights, chosen, axis=1), MIN_VOTE_WEIGHT)
    if preds is not None and gold is not None:
        correct = np.zeros(len(orders))
        for q in rows:
            support: dict[str, float] = {}
            for expert, weight in zip(chosen[q], w[q]):
                letter = preds[q, expert]
                if letter is not None:
                    support[letter] = support.get(letter, 0.0) + weight
            correct[q] = float(bool(support) and max(support, key=support.get) == gold[q])
        return correct
    o = np.nan_to_num(np.take_along_axis(outcomes, chosen, axis=1))
    right, wrong = (w * o).sum(axis=1), (w * (1 - o)).sum(axis=1)
    return np.where(np.isclose(right, wrong), o[:, 0], (right > wrong).astype(float))


def call_cost(orders: np.ndarray, k: int, costs: np.ndarray) -> np.ndarray:
    return costs[orders[:, :k]].sum(axis=1)


@dataclass
class CurveSummary:
    apgr: float
    cpt50: float | None  # normalised cost (call share for two models) to reach 50% of the gap; None: never
    cpt80: float | None
    normalised_cost: list[float]
    accuracy: list[float]


def curve_summary(costs: np.ndarray, accuracies: np.ndarray, weak: tuple[float, float], strong: tuple[float, float],
                  grid_points: int = 1001) -> CurveSummary:
    """APGR and CPT of a cost-quality curve; `weak` and `strong` are (cost, accuracy) pairs.

    The curve is interpolated over normalised cost in [0, 1]. Above its most expensive point it
    stays flat (a larger budget buys the router nothing more); below its cheapest point the router
    cannot run, and counts as recovering nothing (PGR 0).
    """
    span = strong[0] - weak[0]
    gap = strong[1] - weak[1]
    x = (np.asarray(costs, dtype=float) - weak[0]) / span if span > 0 else np.zeros(len(costs))
    order = np.argsort(x, kind="stable")
    x, y = x[order], np.asarray(accuracies, dtype=float)[order]
    grid = np.linspace(0.0, 1.0, grid_points)
    curve = np.interp(grid, x, y, left=weak[1], right=y[-1] if len(y) else weak[1])
    curve = np.where(grid < x[0], weak[1], curve)
    if gap <= 0:
        return CurveSummary(apgr=float("nan"), cpt50=None, cpt80=None, normalised_cost=x.tolist(), accuracy=y.tolist())
    pgr = (curve - weak[1]) / gap
    apgr = float(np.trapezoid(pgr, grid))

    def cpt(share: float) -> float | None:
        reached = np.flatnonzero(pgr >= share - 1e-12)
        return float(grid[reached[0]]) if len(reached) else None

    return CurveSummary(apgr=apgr, cpt50=cpt(0.5), cpt80=cpt(0.8), normalised_cost=x.tolist(), accuracy=y.tolist())


def cascade_calls(orders: np.ndarray, k: int, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Experts called per query by a cascade over the first k of each order: the next is called
    only while the best predicted success among those already called is below `threshold`."""
    called_scores = np.take_along_axis(scores, orders[:, :k], axis=1)
    reached = np.maximum.accumulate(called_scores, axis=1) >= threshold
    return np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, k)


def cascade_accuracy(orders: np.ndarray, k: int, scores: np.ndarray, threshold: float, outcomes: np.ndarray,
                     costs: np.ndarray, preds: np.ndarray | None = None, gold: list[str] | None = None):
    """(correctness, experts called, cost) per query of a cascade; the answers of the experts
    called are fused by the weighted vote of `realised_accuracy` (weights: predicted success)."""
    calls = cascade_calls(orders, k, scores, threshold)
    correct = np.zeros(len(orders))
    cost = np.zeros(len(orders))
    for count in np.unique(calls):
        rows = np.flatnonzero(calls == count)
        correct[rows] = realised_accuracy(orders[rows], int(count), scores[rows], outcomes[rows],
                                          preds[rows] if preds is not None else None,
                                          [gold[i] for i in rows] if gold is not None else None)
        cost[rows] = call_cost(orders[rows], int(count), costs)
    return correct, calls, cost
