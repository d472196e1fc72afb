"""Offline router evaluation on recorded outcomes: fit on one split, score on another.

For a router it reports test accuracy and average cost, the same for the single best expert
(best on the fitting data), the oracle and random, the cost-quality curve over the cost knob with
APGR and CPT(50%) / CPT(80%), and routing latency. Hyperparameters are tuned on a validation
split taken from the training data only (a salted id hash; the test split is never looked at).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from evals.metrics import call_cost, curve_summary, realised_accuracy
from evals.outcomes import OutcomeSet
from routers import ROUTERS, Router, build_router
from routers.base import EmbeddingRouter, SharedEmbed
from routers.baselines import OracleRouter

# Small grids, searched on the validation split; the first entry of each is the router's default.
TUNING_GRIDS: dict[str, dict[str, list]] = {
    "knn": {"neighbours": [50, 10, 20, 100], "margin": [0.05, 0.0, 0.1]},
    "coe": {"smoothing": [20.0, 5.0, 50.0], "min_confidence": [0.4, 0.2], "margin": [0.02, 0.0, 0.05]},
    "symbolic": {"top_skills": [5, 3, 10], "smoothing": [10.0, 30.0], "margin": [0.0, 0.02, 0.05]},
    "glider": {"margin": [0.0, 0.02, 0.05], "min_similarity": [0.0, 0.3]},
}
CURVE_POINTS = 41
LATENCY_QUERIES = 60
LATENCY_BATCH = 64


cached_embed = SharedEmbed(cached=True)  # named after the shared embedder, so saved routers load with it


def embeddings_for(data: OutcomeSet, progress: bool = False) -> np.ndarray:
    from routers.embedder import shared_embedder

    return shared_embedder().embed_cached(data.data.texts, progress=progress)


@dataclass
class Routed:
    """A router's scores on a split, and what they realise there."""

    scores: np.ndarray  # effective scores (after the fallback margin)
    orders: np.ndarray
    correct: np.ndarray
    cost: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())


def route_offline(router: Router, data: OutcomeSet, vectors: np.ndarray | None, cost_threshold: float | None = None,
                  scores: np.ndarray | None = None) -> Routed:
    if scores is None:
        raw, _ = router.scores(data.data.texts, vectors if isinstance(router, EmbeddingRouter) else None)
        scores = router.with_fallback(raw)
    orders = router.order(scores, cost_threshold)
    outcomes = aligned_outcomes(router, data)
    preds = data.preds[:, [data.data.experts.index(e) for e in router.experts]] if data.preds is not None else None
    correct = realised_accuracy(orders, router.k, scores, outcomes, preds, data.gold)
    return Routed(scores, orders, correct, call_cost(orders, router.k, router.cost_vector()))


def aligned_outcomes(router: Router, data: OutcomeSet) -> np.ndarray:
    """The split's outcomes in the router's expert order (0 for an expert the split lacks)."""
    columns = [data.data.experts.index(e) if e in data.data.experts else None for e in router.experts]
    return np.stack([data.data.outcomes[:, c] if c is not None else np.zeros(len(data.data.texts)) for c in columns], axis=1)


@lru_cache(maxsize=1)
def default_helpers() -> dict:
    """The routers' model helpers over the embedded catalog (nothing starts until one is called)."""
    from core.catalog import load_catalog
    from experts.helpers import router_helpers

    return router_helpers(load_catalog())


def make_router(name: str, options: dict, costs: dict[str, float]) -> Router:
    options = dict(options)
    if issubclass(ROUTERS.get(name, Router), EmbeddingRouter):
        options.setdefault("embed", cached_embed)
    return build_router(name, default_helpers(), costs=costs, **options)


def tune(name: str, options: dict, train: OutcomeSet, vectors: np.ndarray, progress: bool = False) -> tuple[dict, list[dict]]:
    """Grid search on the validation split of the training data; returns the best options and the trials."""
    from tqdm import tqdm

    grid = {key: values for key, values in TUNING_GRIDS.get(name, {}).items() if key not in options}
    if not grid:
        return options, []
    held = train.validation_mask()
    fit_part, validation = train.take(np.flatnonzero(~held)), train.take(np.flatnonzero(held))
    trials = []
    combinations = list(itertools.product(*grid.values()))
    for values in tqdm(combinations, desc=f"tuning {name}", unit="fit", disable=not progress):
        trial = {**options, **dict(zip(grid, values))}
        router = make_router(name, trial, train.cost_table).fit(fit_part.data, vectors[~held])
        routed = route_offline(router, validation, vectors[held])
        trials.append({"options": {k: v for k, v in trial.items()}, "accuracy": routed.accuracy, "cost": routed.mean_cost})
    best = max(trials, key=lambda t: (round(t["accuracy"], 6), -t["cost"]))  # equal accuracy: the cheaper
    return best["options"], trials


@dataclass
class OfflineResult:
    summary: dict
    curve: dict
    trials: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {**self.summary, "curve": self.curve, "tuning": self.trials}


def evaluate_offline(name: str, train: OutcomeSet, test: OutcomeSet, k: int | None = None, options: dict | None = None,
                     tune_options: bool = True, latency: bool = True, progress: bool = False,
                     extractor: str | None = None) -> OfflineResult:
    """Fit `name` on train (tuned on its validation split), score it on test, with the baselines.

    `extractor` switches how the router reads test queries after fitting and tuning (symbolic:
    `embedding` or `llm` skills; glider: `query` or `llm` instructions), so the slow LLM side
    runs on the test queries only.
    """
    options = dict(options or {})
    if k is not None:
        options["k"] = k
    train_vectors = embeddings_for(train, progress)
    test_vectors = embeddings_for(test, progress)
    trials: list[dict] = []
    if tune_options and name in TUNING_GRIDS:
        options, trials = tune(name, options, train, train_vectors, progress)
    started = time.perf_counter()
    router = make_router(name, options, train.cost_table).fit(train.data, train_vectors)
    fit_seconds = time.perf_counter() - started
    if extractor is not None:
        router.use_extractor(extractor)
    if isinstance(router, OracleRouter):
        router.reveal(test.data)
    routed = route_offline(router, test, test_vectors)

    single = route_offline(make_router("single_best", {}, train.cost_table).fit(train.data), test, None)
    oracle_router = make_router("oracle", {}, train.cost_table).fit(train.data).reveal(test.data)
    oracle = route_offline(oracle_router, test, None)
    random = route_offline(make_router("random", {}, train.cost_table).fit(train.data), test, None)

    costs = router.cost_vector()
    outcomes = aligned_outcomes(router, test)
    cheapest = int(np.argmin(costs))
    weak = (float(costs[cheapest]), float(outcomes[:, cheapest].mean()))
    strong = (single.mean_cost, single.accuracy)
    points = cost_curve(router, test, routed.scores)
    summary_curve = curve_summary(np.array([p["cost"] for p in points]), np.array([p["accuracy"] for p in points]), weak, strong)

    summary = {
        "router": name, "options": {key: v for key, v in options.items() if key != "embed"}, "k": router.k,
        "aggregator": router.aggregator, "train": train.name, "test": test.name,
        "n_train": len(train.data.texts), "n_test": len(test.data.texts), "experts": len(router.experts),
        "accuracy": routed.accuracy, "cost": routed.mean_cost,
        "best_single": single_best_name(single, router), "best_single_accuracy": single.accuracy, "best_single_cost": single.mean_cost,
        "oracle_accuracy": oracle.accuracy, "oracle_cost": oracle.mean_cost,
        "random_accuracy": random.accuracy, "random_cost": random.mean_cost,
        "weak_model": router.experts[cheapest], "weak_accuracy": weak[1], "weak_cost": weak[0],
        "apgr": summary_curve.apgr, "cpt50": summary_curve.cpt50, "cpt80": summary_curve.cpt80,
        "share_to_best_single": float(np.mean(routed.orders[:, 0] == router.experts.index(single_best_name(single, router)))),
        "fit_seconds": fit_seconds,
    }
    if extractor is not None:
        summary["extractor"] = extractor
    if latency:
        summary.update(measure_latency(router, test, test_vectors))
    return OfflineResult(summary=summary, curve={"points": points, "weak": weak, "strong": strong}, trials=trials)


def single_best_name(single: Routed, router: Router) -> str:
    return router.experts[int(single.orders[0, 0])]


def cost_curve(router: Router, test: OutcomeSet, scores: np.ndarray) -> list[dict]:
    """Accuracy and cost over the cost knob: thresholds at quantiles of the score gaps, 0 to always-cheapest."""
    gaps = (scores.max(axis=1, keepdims=True) - scores).ravel()
    thresholds = np.unique(np.concatenate([[0.0], np.quantile(gaps, np.linspace(0, 1, CURVE_POINTS)), [gaps.max() + 1.0]]))
    points = []
    for threshold in thresholds:
        routed = route_offline(router, test, None, cost_threshold=float(threshold), scores=scores)
        points.append({"threshold": float(threshold), "cost": routed.mean_cost, "accuracy": routed.accuracy})
    return points


def measure_latency(router: Router, test: OutcomeSet, test_vectors: np.ndarray) -> dict:
    """p50 routing time per query: batch 1 with embedding (a live request), batch 64 without it."""
    texts = test.data.texts
    single: list[float] = []
    embeds = isinstance(router, EmbeddingRouter)
    if embeds:
        from routers.embedder import shared_embedder

        live = shared_embedder().embed
        router.embed, cached = live, router.embed
        router.route(texts[:1])  # warm-up: loads the embedder
        for text in texts[:LATENCY_QUERIES]:
            started = time.perf_counter()
            router.route([text])
            single.append(time.perf_counter() - started)
        router.embed = cached
    batched: list[float] = []
    for start in range(0, min(len(texts), 10 * LATENCY_BATCH), LATENCY_BATCH):
        part = slice(start, start + LATENCY_BATCH)
        started = time.perf_counter()
        router.route(texts[part], embeddings=test_vectors[part] if embeds else None)
        batched.append((time.perf_counter() - started) / len(texts[part]))
    return {
        "route_ms_p50": float(np.median(single) * 1000) if single else float(np.median(batched) * 1000),
        "route_ms_p50_batch64_no_embedding": float(np.median(batched) * 1000),
    }


def plot_curves(results: list[OfflineResult], path, title: str) -> None:
    """Accuracy against average cost over the cost knob, one line per router, baselines as marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for result in results:
        points = sorted(result.curve["points"], key=lambda p: p["cost"])
        label = result.summary["router"] + (f" k={result.summary['k']}" if result.summary["k"] > 1 else "")
        ax.plot([p["cost"] for p in points], [p["accuracy"] for p in points], marker=".", label=label)
    first = results[0].summary
    ax.scatter([first["best_single_cost"]], [first["best_single_accuracy"]], marker="*", s=160, color="red",
               label=f"single best ({first['best_single']})", zorder=5)
    ax.scatter([first["oracle_cost"]], [first["oracle_accuracy"]], marker="^", s=90, color="green", label="oracle", zorder=5)
    ax.scatter([first["random_cost"]], [first["random_accuracy"]], marker="x", s=90, color="grey", label="random", zorder=5)
    ax.axhline(first["best_single_accuracy"], color="red", linestyle="--", linewidth=0.8)
    ax.set_xlabel("average cost per query (billions of active parameters called)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
