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
from pathlib import Path

import numpy as np

from evals.metrics import call_cost, curve_summary, paired_interval, realised_accuracy
from evals.outcomes import OutcomeSet
from evals.plots import finish, pyplot
from routers import ROUTERS, Router, build_router
from routers.base import EmbeddingRouter, SharedEmbed
from routers.baselines import OracleRouter

# Small grids, searched on the validation split; the first entry of each is the router's default.
TUNING_GRIDS: dict[str, dict[str, list]] = {
    "knn": {"neighbours": [50, 10, 20, 100], "margin": [0.05, 0.0, 0.1]},
    "coe": {"smoothing": [20.0, 5.0, 50.0], "min_confidence": [0.4, 0.2], "margin": [0.02, 0.0, 0.05]},
    "symbolic": {"top_skills": [5, 3, 10], "smoothing": [10.0, 30.0], "margin": [0.0, 0.02, 0.05]},
    "glider": {"margin": [0.0, 0.02, 0.05], "min_similarity": [0.0, 0.3]},
    "cluster": {"clusters": [60, 30, 100], "smoothing": [10.0, 30.0], "margin": [0.0, 0.02]},
    "mf": {"dim": [64, 128], "dropout": [0.5, 0.3], "margin": [0.0, 0.02]},
    "best": {"margin": [0.02, 0.0, 0.05]},
    # dc: none. Each option set trains an encoder (minutes on a CPU), and the knn/cluster rows over
    # its embeddings would need one trained without the validation part to be tuned honestly.
}
CURVE_POINTS = 41
LATENCY_QUERIES = 500
LATENCY_BATCH = 64


def embedder_for(encoder: str | None = None):
    """The default routing embedder, or the one of a fine-tuned encoder folder."""
    from routers.embedder import embedder_at, shared_embedder

    return embedder_at(encoder) if encoder else shared_embedder()


cached_embed = SharedEmbed(cached=True)  # named after the shared embedder, so saved routers load with it


def cached_embed_for(encoder: str | None):
    """An embed function reading the embedding cache of `encoder` (None: the default embedder)."""
    return SharedEmbed(cached=True, encoder=encoder)


def embeddings_for(data: OutcomeSet, progress: bool = False, encoder: str | None = None) -> np.ndarray:
    return embedder_for(encoder).embed_cached(data.data.texts, progress=progress)


def router_vectors(router: Router, data: OutcomeSet, default: np.ndarray | None) -> np.ndarray | None:
    """A split's embeddings in the router's own space (its fine-tuned encoder's, where it has one)."""
    if not isinstance(router, EmbeddingRouter):
        return None
    return embeddings_for(data, encoder=router.encoder) if router.encoder else default


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
        raw, _ = router.scores(data.data.texts, router_vectors(router, data, vectors))
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
        options.setdefault("embed", cached_embed_for(options.get("encoder")))
    return build_router(name, default_helpers(), costs=costs, **options)


def validation_split(train: OutcomeSet) -> tuple[np.ndarray, OutcomeSet, OutcomeSet]:
    """(held mask, fit part, validation part) of a training set."""
    held = train.validation_mask()
    return held, train.take(np.flatnonzero(~held)), train.take(np.flatnonzero(held))


# Options that only change how fitted scores are ranked (or what the Decision carries), never the
# fit: a tuning grid over them fits once, and a fitted router is reused across them.
RANKING_OPTIONS = ("k", "margin", "cascade", "cost_threshold", "load_penalty")
_FITTED: dict[tuple, Router] = {}
FITTED_MEMO_SIZE = 64


def fitted_router(name: str, options: dict, train: OutcomeSet, data: OutcomeSet, vectors: np.ndarray | None) -> Router:
    """`make_router(...).fit(data, vectors)`, memoised within a run: evaluations that fit the same
    router on the same rows (tuning, the cascade and history evaluations) fit it once. The ranking
    options are set on a shallow copy, so the memoised router is never changed."""
    import copy
    import hashlib
    import json

    fit_options = {key: v for key, v in options.items() if key not in RANKING_OPTIONS and key != "embed"}
    rows = hashlib.sha256("\x00".join(data.data.ids or data.data.texts).encode()).hexdigest()
    key = (name, json.dumps(fit_options, sort_keys=True, default=str), train.name, data.name, rows)
    if key not in _FITTED:
        if len(_FITTED) >= FITTED_MEMO_SIZE:
            _FITTED.pop(next(iter(_FITTED)))
        _FITTED[key] = make_router(name, fit_options, train.cost_table).fit(data.data, vectors)
    router = copy.copy(_FITTED[key])
    reference = make_router(name, {k: v for k, v in options.items() if k in RANKING_OPTIONS}, train.cost_table)
    for option in ("k", "aggregator", "margin", "cascade", "cost_threshold", "load_penalty"):
        setattr(router, option, getattr(reference, option))
    return router


def tune(name: str, options: dict, train: OutcomeSet, vectors: np.ndarray, progress: bool = False,
         always: bool = False) -> tuple[dict, list[dict]]:
    """Grid search on the validation split of the training data; returns the best options and the
    trials (each with its validation accuracy and cost, and the knob points of `knob_points`).
    `always`: score the given options on validation even where there is no grid."""
    from tqdm import tqdm

    grid = {key: values for key, values in TUNING_GRIDS.get(name, {}).items() if key not in options}
    if not grid and not always:
        return options, []
    held, fit_part, validation = validation_split(train)
    trials = []
    combinations = list(itertools.product(*grid.values()))
    for values in tqdm(combinations, desc=f"tuning {name}", unit="fit", disable=not progress):
        trial = {**options, **dict(zip(grid, values))}
        router = fitted_router(name, trial, train, fit_part, vectors[~held])
        routed = route_offline(router, validation, vectors[held])
        single = route_offline(make_router("single_best", {}, train.cost_table).fit(fit_part.data), validation, None)
        trials.append({"options": {k: v for k, v in trial.items() if k != "embed"}, "accuracy": routed.accuracy,
                       "cost": routed.mean_cost, "single_best_accuracy": single.accuracy,
                       "knobs": knob_points(router, validation, routed.scores, single)})
    best = max(trials, key=lambda t: (round(t["accuracy"], 6), -t["cost"]))  # equal accuracy: the cheaper
    return {**options, **best["options"]}, trials


def knob_points(router: Router, validation: OutcomeSet, scores: np.ndarray, single: Routed) -> dict:
    """Cost-knob thresholds chosen on validation for the two Avengers-Pro points: the most accurate
    at no more than the single best's cost, and the cheapest at the single best's accuracy."""
    points = cost_curve(router, validation, scores)
    affordable = [p for p in points if p["cost"] <= single.mean_cost + 1e-9]
    as_good = [p for p in points if p["accuracy"] >= single.accuracy - 1e-12]
    return {
        "best_at_single_cost": max(affordable, key=lambda p: (p["accuracy"], -p["cost"]))["threshold"] if affordable else None,
        "cheapest_at_single_accuracy": min(as_good, key=lambda p: (p["cost"], -p["accuracy"]))["threshold"] if as_good else None,
    }


@dataclass
class OfflineResult:
    summary: dict
    curve: dict
    trials: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {**self.summary, "curve": self.curve, "tuning": self.trials}


def evaluate_offline(name: str, train: OutcomeSet, test: OutcomeSet, k: int | None = None, options: dict | None = None,
                     tune_options: bool = True, latency: bool = True, progress: bool = False,
                     extractor: str | None = None, validate: bool = False) -> OfflineResult:
    """Fit `name` on train (tuned on its validation split), score it on test, with the baselines.

    `extractor` switches how the router reads test queries after fitting and tuning (symbolic:
    `embedding` or `llm` skills; glider: `query` or `llm` instructions), so the slow LLM side
    runs on the test queries only.
    """
    options = dict(options or {})
    if k is not None:
        options["k"] = k
    train_vectors = embeddings_for(train, progress, encoder=options.get("encoder"))
    test_vectors = embeddings_for(test, progress, encoder=options.get("encoder"))
    trials: list[dict] = []
    if tune_options and name in TUNING_GRIDS:
        options, trials = tune(name, options, train, train_vectors, progress)
    elif validate:
        _, trials = tune(name, options, train, train_vectors, progress, always=True)
    started = time.perf_counter()
    router = fitted_router(name, options, train, train, train_vectors)
    fit_seconds = time.perf_counter() - started
    if extractor is not None:
        router.use_extractor(extractor)
    if isinstance(router, OracleRouter):
        router.reveal(test.data)
    test_vectors = router_vectors(router, test, test_vectors)
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
        "encoder": Path(router.encoder).name if isinstance(router, EmbeddingRouter) and router.encoder else None,
        "aggregator": router.aggregator, "train": train.name, "test": test.name,
        "n_train": len(train.data.texts), "n_test": len(test.data.texts), "experts": len(router.experts),
        "accuracy": routed.accuracy, "cost": routed.mean_cost,
        "best_single": single_best_name(single, router), "best_single_accuracy": single.accuracy, "best_single_cost": single.mean_cost,
        "vs_single_best_interval": paired_interval(routed.correct, single.correct),
        "oracle_accuracy": oracle.accuracy, "oracle_cost": oracle.mean_cost,
        "random_accuracy": random.accuracy, "random_cost": random.mean_cost,
        "weak_model": router.experts[cheapest], "weak_accuracy": weak[1], "weak_cost": weak[0],
        "apgr": summary_curve.apgr, "cpt50": summary_curve.cpt50, "cpt80": summary_curve.cpt80,
        "share_to_best_single": float(np.mean(routed.orders[:, 0] == router.experts.index(single_best_name(single, router)))),
        "fit_seconds": fit_seconds,
    }
    chosen = max(trials, key=lambda t: (round(t["accuracy"], 6), -t["cost"])) if trials else None
    if chosen is not None:
        summary["validation_accuracy"] = chosen["accuracy"]
        summary["validation_single_best_accuracy"] = chosen["single_best_accuracy"]
        summary["knob_points"] = {}
        for point, threshold in chosen["knobs"].items():
            if threshold is not None:
                at = route_offline(router, test, None, cost_threshold=threshold, scores=routed.scores)
                summary["knob_points"][point] = {"threshold": threshold, "accuracy": at.accuracy, "cost": at.mean_cost}
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
        live = embedder_for(router.encoder).embed
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors[: max(len(results), 1)])
    for result in results:
        points = sorted(result.curve["points"], key=lambda p: p["cost"])
        label = result.summary.get("label") or result.summary["router"] + (f" k={result.summary['k']}" if result.summary["k"] > 1 else "")
        ax.plot([p["cost"] for p in points], [p["accuracy"] for p in points], marker=".", label=label)
    first = results[0].summary
    ax.scatter([first["best_single_cost"]], [first["best_single_accuracy"]], marker="*", s=160, color="red",
               label=f"single best ({first['best_single']})", zorder=5)
    ax.scatter([first["oracle_cost"]], [first["oracle_accuracy"]], marker="^", s=90, color="green", label="oracle", zorder=5)
    ax.scatter([first["random_cost"]], [first["random_accuracy"]], marker="x", s=90, color="grey", label="random", zorder=5)
    ax.axhline(first["best_single_accuracy"], color="red", linestyle="--", linewidth=0.8)
    ax.set_xlabel("average cost per query (billions of active parameters called)")
    ax.set_ylabel("accuracy")
    finish(fig, ax, path, title)


# -- adaptive k (a cascade) ----------------------------------------------------------------------

def cascade_sweep(router: Router, data: OutcomeSet, scores: np.ndarray, k: int, thresholds: np.ndarray) -> list[dict]:
    """Accuracy, experts called and cost per cascade threshold (orders from the router's ranking)."""
    from evals.metrics import cascade_accuracy

    orders = router.order(scores)
    outcomes = aligned_outcomes(router, data)
    preds = data.preds[:, [data.data.experts.index(e) for e in router.experts]] if data.preds is not None else None
    points = []
    for threshold in thresholds:
        correct, calls, cost = cascade_accuracy(orders, k, scores, float(threshold), outcomes, router.cost_vector(), preds, data.gold)
        points.append({"threshold": float(threshold), "accuracy": float(correct.mean()), "experts": float(calls.mean()),
                       "cost": float(cost.mean())})
    return points


def evaluate_cascade(name: str, train: OutcomeSet, test: OutcomeSet, options: dict | None = None, k: int = 3,
                     max_experts: float = 1.5) -> dict:
    """A router's cascade over its top k: the threshold is chosen on the validation part of train
    (the most accurate with at most `max_experts` called per query on average), then the router
    refitted on all of train is scored on test with it; with the test curve over every threshold."""
    options = {key: v for key, v in (options or {}).items() if key not in ("k", "cascade")}
    held, fit_part, validation = validation_split(train)
    vectors = embeddings_for(train, encoder=options.get("encoder"))
    router = fitted_router(name, {**options, "k": k}, train, fit_part, vectors[~held])
    validation_scores = router.with_fallback(router.scores(validation.data.texts, router_vectors(router, validation, vectors[held]))[0])
    top = validation_scores.max(axis=1)
    thresholds = np.unique(np.concatenate([[-1.0, 2.0], np.quantile(top, np.linspace(0, 1, CURVE_POINTS))]))
    on_validation = cascade_sweep(router, validation, validation_scores, k, thresholds)
    allowed = [p for p in on_validation if p["experts"] <= max_experts + 1e-9]
    chosen = max(allowed, key=lambda p: (p["accuracy"], -p["experts"]))
    router = fitted_router(name, {**options, "k": k, "cascade": chosen["threshold"]}, train, train, vectors)
    test_scores = router.with_fallback(router.scores(test.data.texts, router_vectors(router, test, embeddings_for(test)))[0])
    on_test = cascade_sweep(router, test, test_scores, k, np.unique(np.concatenate(
        [[-1.0, 2.0, chosen["threshold"]], np.quantile(test_scores.max(axis=1), np.linspace(0, 1, CURVE_POINTS))])))
    at = next(p for p in on_test if p["threshold"] == chosen["threshold"])
    return {"router": name, "k": k, "options": {key: v for key, v in options.items() if key != "embed"},
            "max_experts": max_experts, "threshold": chosen["threshold"], "validation": chosen,
            "accuracy": at["accuracy"], "experts": at["experts"], "cost": at["cost"],
            "k1": next(p for p in on_test if p["threshold"] == -1.0), "k_all": next(p for p in on_test if p["threshold"] == 2.0),
            "curve": on_test}


# -- conversations: routing turn 2 with turn 1 mixed in --------------------------------------------

HISTORY_WEIGHTS = (0.0, 0.15, 0.3, 0.5, 1.0)


def two_turn_conversations(data: OutcomeSet, seed: int = 0) -> dict[str, np.ndarray]:
    """For every row (turn 2), the row of a turn 1 drawn from the same category, and one from another."""
    rng = np.random.default_rng(seed)
    categories = np.array(data.data.categories or ["all"] * len(data.data.texts))
    rows = np.arange(len(categories))
    same, other = np.zeros(len(rows), dtype=int), np.zeros(len(rows), dtype=int)
    for row, category in enumerate(categories):
        pool = rows[(categories == category) & (rows != row)]
        same[row] = rng.choice(pool) if len(pool) else row
        pool = rows[categories != category]
        other[row] = rng.choice(pool) if len(pool) else row
    return {"same category": same, "other category": other}


def history_accuracy(router: EmbeddingRouter, data: OutcomeSet, vectors: np.ndarray, weights=HISTORY_WEIGHTS) -> dict:
    """Accuracy of the expert chosen for turn 2, per kind of turn 1 and history weight."""
    from routers.base import mix_history

    outcomes = aligned_outcomes(router, data)
    result = {}
    for kind, first in two_turn_conversations(data).items():
        result[kind] = {}
        for weight in weights:
            mixed = mix_history(vectors, [vectors[j][None, :] for j in first], weight)
            scores = router.with_fallback(router.scores_from_embeddings(mixed, data.data.texts)[0])
            chosen = router.order(scores)[:, 0]
            result[kind][str(weight)] = float(np.nan_to_num(outcomes[np.arange(len(chosen)), chosen]).mean())
    return result


def evaluate_history(name: str, train: OutcomeSet, test: OutcomeSet, options: dict | None = None) -> dict:
    """Turn-2 accuracy with and without the conversation: the weight is chosen on the validation
    part of train (mean over same- and other-category first turns), then reported on test."""
    options = {key: v for key, v in (options or {}).items() if key != "k"}
    held, fit_part, validation = validation_split(train)
    vectors = embeddings_for(train, encoder=options.get("encoder"))
    router = fitted_router(name, options, train, fit_part, vectors[~held])
    on_validation = history_accuracy(router, validation, router_vectors(router, validation, vectors[held]))
    mean = {w: np.mean([on_validation[kind][w] for kind in on_validation]) for w in on_validation["same category"]}
    chosen = max(mean, key=lambda w: (round(mean[w], 6), -float(w)))
    router = fitted_router(name, options, train, train, vectors)
    on_test = history_accuracy(router, test, router_vectors(router, test, embeddings_for(test)))
    return {"router": name, "options": {key: v for key, v in options.items() if key != "embed"},
            "chosen_weight": float(chosen), "validation": on_validation, "test": on_test}
