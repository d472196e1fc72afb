"""The Router protocol and what every router shares: outcome data, ranking, the cost knob, the
fallback to a safe expert, and save and load.

A router is fitted on outcome data (query texts with a per-expert score in [0, 1], missing where
an expert did not answer) and predicts each expert's success on new queries (`scores`). Ranking
those predictions into Decisions happens here once, for every router:

1. Fallback: the router leaves its fallback expert (configured, else the single best expert on the
   fitting data) only where another expert's predicted success beats the fallback's by more than
   `margin`. Routers whose evidence is noisy default to a margin, so they never do worse than
   always calling the single best expert by chasing noise.
   Ties go to the fallback too, so a router with nothing to tell the experts apart never lands on
   an arbitrary one.
2. Residency (`load_penalty`, given the seconds each expert takes to reach the device): among the
   experts whose predicted success is within `load_penalty` of the leader's, the one that loads
   fastest (a resident one: 0 s) leads. 0 ignores residency; the default is DEFAULT_LOAD_PENALTY.
3. Cost knob (RouteLLM-style): among the experts whose predicted success is within
   `cost_threshold` of the leader's, the cheapest answers. 0 is pure quality; 1 always calls the
   cheapest expert. `calibrate` sets it for a target share of calls to the most expensive expert.

Adaptive k: with `cascade` set, Decisions carry it and the engine calls the k chosen experts one
at a time, the next only while the best predicted success among those that answered is below it.

Conversations: `route(..., history=...)` takes each query's earlier user turns (most recent
last); embedding routers mix their embeddings into the query's with weights decaying by
`history_weight` per turn back.

Data that cannot support a choice (an expert that never answered or never succeeded, outcomes
that tie everywhere) is reported at fit time with a `RoutingDataWarning` naming what was left
out; such experts are never predicted above 0.

Fitted state saves to a versioned router folder: JSON, .npz (never pickle) and a manifest
(routers/folder.py).
"""

from __future__ import annotations

import itertools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.catalog import Catalog
from core.errors import CoeError
from core.types import Decision, ExpertScore
from routers.folder import (
    FORMAT_VERSION,
    Calibration,
    Created,
    FittingData,
    RouterManifest,
    check_embedder,
    json_safe,
    read_router_folder,
    write_router_folder,
)
from routers.folder import fingerprint as data_fingerprint
from routers.linear import LinearModel


@dataclass
class OutcomeData:
    """Rows of queries with per-expert outcomes; NaN marks an expert that did not answer."""

    texts: list[str]
    experts: list[str]
    outcomes: np.ndarray  # shape (len(texts), len(experts)), float
    categories: list[str] | None = None
    ids: list[str] = field(default_factory=list)
    expert_skills: dict[str, list[str]] = field(default_factory=dict)  # skills an expert declares (its catalog entry)

    def __post_init__(self):
        self.outcomes = np.asarray(self.outcomes, dtype=np.float64)
        if self.outcomes.shape != (len(self.texts), len(self.experts)):
            raise ValueError(f"outcomes shape {self.outcomes.shape} does not match {len(self.texts)} texts x {len(self.experts)} experts")

    def take(self, rows) -> OutcomeData:
        rows = np.asarray(rows, dtype=int)
        return OutcomeData(
            texts=[self.texts[i] for i in rows], experts=list(self.experts), outcomes=self.outcomes[rows],
            categories=[self.categories[i] for i in rows] if self.categories is not None else None,
            ids=[self.ids[i] for i in rows] if self.ids else [], expert_skills=self.expert_skills,
        )

    @classmethod
    def from_examples(cls, examples: dict[str, list[str]], categories: dict[str, str] | None = None) -> OutcomeData:
        """Routing data with no recorded outcomes: each expert's example prompts, labelled with
        that expert (outcome 1) and not the others (0); a category per expert if given."""
        experts = [e for e, texts in examples.items() if texts]
        texts = [t for e in experts for t in examples[e]]
        labels = np.repeat(np.arange(len(experts)), [len(examples[e]) for e in experts])
        outcomes = np.zeros((len(texts), len(experts)))
        outcomes[np.arange(len(texts)), labels] = 1.0
        return cls(texts=texts, experts=experts, outcomes=outcomes,
                   categories=[(categories or {}).get(experts[i], experts[i]) for i in labels])

    def fingerprint(self) -> str:
        return data_fingerprint(self.texts, self.experts, self.outcomes, self.categories)

    def expert_means(self) -> np.ndarray:
        """Each expert's mean outcome over the rows it answered (0 where it answered none)."""
        observed = ~np.isnan(self.outcomes)
        totals = np.where(observed, self.outcomes, 0.0).sum(axis=0)
        return np.divide(totals, observed.sum(axis=0), out=np.zeros(len(self.experts)), where=observed.any(axis=0))


def catalog_examples(catalog: Catalog, per_expert: int | None = None) -> OutcomeData:
    """A catalog's routing examples as fitting data (at most `per_expert` per expert), each
    expert's first task as its category and its skills as declared skills (zero-data start: no
    recorded outcomes needed). An expert with no examples has its description as its one example."""
    examples = {e.name: catalog.examples_of(e)[:per_expert] or [e.description] for e in catalog.experts}
    data = OutcomeData.from_examples(examples, {e.name: e.tasks[0] for e in catalog.experts if e.tasks})
    data.expert_skills = {e.name: list(e.skills) for e in catalog.experts if e.skills}
    return data


EmbedFn = Callable[[list[str]], np.ndarray]

# Chosen on the validation part of MMLU-Pro's train split through the replay pipeline: the largest
# penalty of evals/bench_residency.py's grid that costs at most 0.3 pp there, for knn and symbolic
# with tuned options and with their defaults (evals/results/bench_residency.json).
DEFAULT_LOAD_PENALTY = 0.1
History = list[list[str]]  # per query, its earlier user turns, most recent last


class RoutingDataWarning(UserWarning):
    """Fitting data that cannot support some choice; the message names what was left out."""


def check_outcomes(data: OutcomeData) -> tuple[list[str], bool]:
    """Experts to leave out of routing (never answered or never succeeded), and whether the
    outcomes tie everywhere (nothing to route on), with a warning for each problem found."""
    observed = ~np.isnan(data.outcomes)
    left_out = []
    for column, expert in enumerate(data.experts):
        answered = int(observed[:, column].sum())
        if answered == 0:
            left_out.append(expert)
            warnings.warn(f"expert {expert!r} has no outcome on any of the {len(data.texts)} fitting queries: "
                          "left out (never predicted above 0)", RoutingDataWarning, stacklevel=3)
        elif answered < len(data.texts):
            warnings.warn(f"expert {expert!r} has no outcome on {len(data.texts) - answered} of {len(data.texts)} "
                          "fitting queries: those rows are left out of its estimates", RoutingDataWarning, stacklevel=3)
        if answered and np.nansum(data.outcomes[:, column]) <= 0:
            left_out.append(expert)
            warnings.warn(f"expert {expert!r} is never right on the fitting data: left out "
                          "(never predicted above 0)", RoutingDataWarning, stacklevel=3)
    filled = np.where(observed, data.outcomes, np.nan)
    tied = False
    if len(data.texts) and len(data.experts) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            spread = np.nanmax(filled, axis=1) - np.nanmin(filled, axis=1)
        compared = observed.sum(axis=1) >= 2
        tied = bool(np.all(np.nan_to_num(spread[compared]) == 0))
        if tied and not compared.all():
            # Rows scoring one expert each (feedback on single answers) tell experts apart
            # across rows: only when every outcome is the same is there nothing to route on.
            values = data.outcomes[observed]
            tied = not len(values) or bool(values.max() == values.min())
        if tied:
            warnings.warn("every expert has the same outcome on every fitting query: nothing tells them apart, "
                          "so every query goes to the fallback (single best) expert", RoutingDataWarning, stacklevel=3)
    return list(dict.fromkeys(left_out)), tied


def mix_history(vectors: np.ndarray, history_vectors: list[np.ndarray], weight: float) -> np.ndarray:
    """Each query's vector plus its earlier turns' vectors weighted `weight`, `weight`**2, ... (most
    recent earlier turn first), renormalised. `history_vectors[i]` has one row per earlier turn of
    query i, oldest first."""
    vectors = np.array(vectors, dtype=np.float32)
    if weight <= 0:
        return vectors
    for row, turns in enumerate(history_vectors):
        if turns is None or not len(turns):
            continue
        decay = weight ** np.arange(len(turns), 0, -1, dtype=np.float32)  # oldest gets the highest power
        mixed = vectors[row] + decay @ np.asarray(turns, dtype=np.float32)
        vectors[row] = mixed / max(float(np.linalg.norm(mixed)), 1e-12)
    return vectors

LEAD_EPSILON = 1e-6  # lifts a preferred expert just above the best score, keeping the scale


class Router(ABC):
    """Subclasses implement `_fit`, `scores` and the state they save; ranking lives here once."""

    name: str = "router"
    default_margin: float = 0.0  # routers with noisy per-query evidence default to a safety margin
    # What `save` writes: attributes as JSON, numpy arrays as NPZ, and fitted linear models
    # (None where absent). Subclasses extend the tuples; `set_state` restores them all.
    config_fields: tuple[str, ...] = ("experts", "k", "aggregator", "cost_threshold", "costs", "margin", "fallback_expert",
                                      "cascade", "load_penalty", "left_out", "tied")
    array_fields: tuple[str, ...] = ("prior",)
    model_fields: tuple[str, ...] = ()
    helpers: tuple[str, ...] = ()  # model helpers it takes as options (`llm`, `token_states`), handed in by the caller
    predicts: bool = True  # its scores predict success (not a random draw or revealed outcomes): ties go to the fallback

    def __init__(self, k: int = 1, aggregator: str | None = None, cost_threshold: float = 0.0,
                 costs: dict[str, float] | None = None, margin: float | None = None, fallback_expert: str | None = None,
                 cascade: float | None = None, load_penalty: float = DEFAULT_LOAD_PENALTY):
        self.k = k
        self.cascade = cascade  # adaptive k: call the next of the k chosen only while predicted success is below it
        self.load_penalty = load_penalty  # predicted-success margin within which the fastest-loading expert leads
        self.left_out: list[str] = []  # experts the fitting data could not support (never predicted above 0)
        self.tied = False  # the fitting outcomes tie everywhere: every query goes to the fallback
        self.aggregator = aggregator or ("vote" if k > 1 else "passthrough")
        self.cost_threshold = cost_threshold
        self.costs = dict(costs or {})
        self.margin = self.default_margin if margin is None else margin
        self.fallback_expert = fallback_expert
        self.experts: list[str] = []
        self.prior = np.zeros(0)  # each expert's mean outcome on the fitting data
        # What the router folder's manifest says besides the fitted state (routers/folder.py).
        self.options: dict = {}  # the options it was built with (build_router records them)
        self.fitted_on: FittingData | None = None
        self.calibration: Calibration | None = None
        self.created: Created | None = None

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, data: OutcomeData, embeddings: np.ndarray | None = None) -> Router:
        """Fit on outcome data; `embeddings` (one row per text) spares routers that embed the work."""
        self.left_out, self.tied = check_outcomes(data)
        if self.fallback_expert is not None and self.fallback_expert not in data.experts:
            # A general expert the data has no outcomes for (the base model of a LoRA pool).
            data = OutcomeData(texts=data.texts, experts=[*data.experts, self.fallback_expert],
                               outcomes=np.hstack([data.outcomes, np.full((len(data.texts), 1), np.nan)]),
                               categories=data.categories, ids=data.ids, expert_skills=data.expert_skills)
        self.experts = list(data.experts)
        self.prior = data.expert_means()
        self._fit(data, embeddings)
        self.fitted_on = FittingData(fingerprint=data.fingerprint(), rows=len(data.texts))
        self.calibration = self.created = None
        return self

    @abstractmethod
    def _fit(self, data: OutcomeData, embeddings: np.ndarray | None) -> None: ...

    @property
    def fallback(self) -> str:
        """The safe expert: the configured one, else the single best on the fitting data (ties:
        the first in the data's expert order, never a random one)."""
        return self.fallback_expert or self.experts[int(np.argmax(self.prior))]

    # -- prediction and ranking -------------------------------------------------------------

    @abstractmethod
    def scores(self, texts: list[str], embeddings: np.ndarray | None = None,
               history: History | None = None) -> tuple[np.ndarray, list[str]]:
        """Predicted success per (query, expert), shape (n, len(self.experts)), and an explanation per query."""

    def prefer(self, scores: np.ndarray, rows: np.ndarray, expert: str) -> np.ndarray:
        """Make `expert` lead on the given rows (a boolean mask), just above the row's best score."""
        column = self.experts.index(expert)
        scores[rows, column] = scores[rows].max(axis=1) + LEAD_EPSILON
        return scores

    def with_fallback(self, scores: np.ndarray) -> np.ndarray:
        """Scores where the fallback leads unless another expert beats it by more than `margin`
        (ties included: with nothing to tell experts apart, the fallback answers). Left-out
        experts are predicted 0."""
        scores = np.array(scores, dtype=np.float64)
        if not len(scores):
            return scores
        left_out = [self.experts.index(e) for e in getattr(self, "left_out", []) if e in self.experts and e != self.fallback]
        if left_out:
            scores[:, left_out] = np.minimum(scores[:, left_out], 0.0)
        if not self.predicts:
            return scores
        column = self.experts.index(self.fallback)
        if getattr(self, "tied", False):
            return self.prefer(scores, np.ones(len(scores), dtype=bool), self.fallback)
        return self.prefer(scores, scores.max(axis=1) - scores[:, column] <= max(self.margin, 0.0) + 1e-12, self.fallback)

    def with_residency(self, scores: np.ndarray, load_seconds: np.ndarray | None, load_penalty: float | None = None) -> np.ndarray:
        """Scores where, among the experts within `load_penalty` of the leader, the fastest to load
        (ties: the higher score) leads. `load_seconds`: per expert, seconds to bring it to the device."""
        penalty = self.load_penalty if load_penalty is None else load_penalty
        # A random draw or revealed outcomes are baselines: residency would change what they measure.
        if load_seconds is None or penalty <= 0 or not len(scores) or not self.predicts:
            return scores
        load = np.asarray(load_seconds, dtype=np.float64)
        within = scores >= scores.max(axis=1, keepdims=True) - penalty - 1e-12
        keyed = np.where(within, load[None, :], np.inf)
        pick = np.lexsort((-scores, keyed), axis=1)[:, 0]
        rows = np.arange(len(scores))
        lift = load[pick] < load[np.argmax(scores, axis=1)]
        scores = np.array(scores)
        scores[rows[lift], pick[lift]] = scores[lift].max(axis=1) + LEAD_EPSILON
        return scores

    def cost_vector(self) -> np.ndarray:
        return np.array([self.costs.get(e, 0.0) for e in self.experts], dtype=np.float64)

    def rank(self, scores: np.ndarray, cost_threshold: float | None = None) -> np.ndarray:
        """Expert indices per query, best first, after the fallback margin and the cost knob.

        Experts within the threshold of the leader come first, cheapest first (ties: higher
        score); the rest follow by score. With no costs set or a zero threshold this is the plain
        score order.
        """
        return self.order(self.with_fallback(scores), cost_threshold)

    def order(self, effective: np.ndarray, cost_threshold: float | None = None) -> np.ndarray:
        """`rank` for scores that already carry the fallback margin (`with_fallback`)."""
        threshold = self.cost_threshold if cost_threshold is None else cost_threshold
        eligible = effective >= effective.max(axis=1, keepdims=True) - threshold - 1e-12
        cost = np.where(eligible, self.cost_vector()[None, :], 0.0)
        # lexsort: the last key is primary. Stable, so remaining ties keep the expert order.
        return np.lexsort((-effective, cost, ~eligible), axis=1)

    def route(self, texts: list[str], query_ids: list[str] | None = None, policy: str | None = None,
              embeddings: np.ndarray | None = None, cost_threshold: float | None = None,
              history: History | None = None, load_seconds: np.ndarray | None = None) -> list[Decision]:
        """Decisions for `texts`; `history`: each query's earlier user turns (most recent last);
        `load_seconds`: per expert (in `self.experts` order), seconds to bring it to the device."""
        if not self.experts:
            raise RuntimeError(f"router {self.name!r} is not fitted")
        query_ids = query_ids or [str(i) for i in range(len(texts))]
        raw, explanations = self.scores(texts, embeddings, history=history)
        fallen = self.with_fallback(raw)
        effective = self.with_residency(fallen, load_seconds)
        orders = self.order(effective, cost_threshold)
        decisions = []
        for qid, raw_row, fallen_row, row, order, why in zip(query_ids, raw, fallen, effective, orders, explanations):
            best = int(np.argmax(raw_row))
            if order[0] == int(np.argmax(row)) and order[0] != int(np.argmax(fallen_row)):
                why += (f"; load penalty {self.load_penalty}: {self.experts[order[0]]} is within it of "
                        f"{self.experts[int(np.argmax(fallen_row))]} and loads faster")
            elif self.margin > 0 and order[0] != best and self.experts[order[0]] == self.fallback and why:
                why += f"; {self.experts[best]} does not beat {self.fallback} by more than {self.margin}, so {self.fallback} answers"
            elif order[0] != int(np.argmax(row)):
                why += (f"; cost knob {self.cost_threshold if cost_threshold is None else cost_threshold}: "
                        f"{self.experts[order[0]]} is within it of {self.experts[int(np.argmax(row))]} and cheaper")
            ranked = [ExpertScore(expert=self.experts[j], score=round(float(row[j]), 4)) for j in order]
            decisions.append(
                Decision(query_id=qid, policy=policy or self.name, ranked=ranked, k=min(self.k, len(ranked)),
                         aggregator=self.aggregator, explanation=why, cascade=self.cascade,
                         aggregator_expert=getattr(self, "aggregator_expert", None))
            )
        return decisions

    def calibrate(self, texts: list[str], target_share: float, embeddings: np.ndarray | None = None) -> tuple[float, float]:
        """Set the cost threshold so that `target_share` of these queries go to the most expensive
        expert; returns (threshold, the share it gives on these queries). Where even threshold 0
        sends fewer there, the share says so."""
        effective = self.with_fallback(self.scores(texts, embeddings)[0])
        costs = self.cost_vector()
        self.cost_threshold = calibrate_cost_threshold(effective, costs, target_share)
        top = np.flatnonzero(costs >= costs.max())

        def share(threshold: float | None) -> float:
            return float(np.isin(self.order(effective, threshold)[:, 0], top).mean()) if len(effective) else 0.0

        achieved = share(None)
        self.calibration = Calibration(cost_threshold=self.cost_threshold, target_share=target_share, achieved_share=achieved,
                                       max_share=share(0.0), most_expensive=[self.experts[i] for i in top], queries=len(texts))
        return self.cost_threshold, achieved

    # -- persistence: config JSON + arrays NPZ ----------------------------------------------

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        config = {name: getattr(self, name) for name in self.config_fields}
        arrays = {name: getattr(self, name) for name in self.array_fields}
        for name in self.model_fields:
            if getattr(self, name) is not None:
                arrays.update(getattr(self, name).arrays(name))
        return config, arrays

    def set_state(self, config: dict, arrays: dict[str, np.ndarray]) -> None:
        for name in self.config_fields:
            if name in config:  # a field added after the router was saved keeps its default
                setattr(self, name, config[name])
        for name in self.array_fields:
            setattr(self, name, arrays[name])
        for name in self.model_fields:
            setattr(self, name, LinearModel.from_arrays(arrays, name) if f"{name}_weights" in arrays else None)

    @property
    def embedder_name(self) -> str | None:
        """The query embedder this router reads through (None: it embeds nothing)."""
        return None

    def save(self, directory: str | Path) -> RouterManifest:
        """Write the router folder (routers/folder.py): fitted state, arrays and manifest."""
        if not self.experts:
            raise RuntimeError(f"router {self.name!r} is not fitted")
        config, arrays = self.state()
        self.created = self.created or Created()
        manifest = RouterManifest(format_version=FORMAT_VERSION, router=self.name, options=json_safe(self.options),
                                  embedder=self.embedder_name, experts=list(self.experts), data=self.fitted_on,
                                  calibration=self.calibration, created=self.created)
        return write_router_folder(directory, manifest, {"router": self.name, **config}, arrays)

    @classmethod
    def load(cls, directory: str | Path, **kwargs) -> Router:
        """A router from its folder; the folder's version and embedder are checked (CoeError)."""
        manifest, config, arrays = read_router_folder(directory)
        if manifest.router != cls.name:
            raise CoeError(f"router folder {directory} holds a {manifest.router} router, not {cls.name}",
                           "load it with routers.load_router, which takes the router the folder names")
        if config.get("encoder") and "embed" not in kwargs:
            kwargs = {"encoder": config["encoder"], **kwargs}  # embed as fitted: through its own encoder
        router = cls(**kwargs)
        check_embedder(directory, manifest.embedder, router.embedder_name)
        router.set_state(config, arrays)
        router.options, router.fitted_on = manifest.options, manifest.data
        router.calibration, router.created = manifest.calibration, manifest.created
        return router


class EmbeddingRouter(Router):
    """A router that reads queries through sentence embeddings (injectable, for tests).

    `encoder`: a folder with a fine-tuned query encoder (routers/encoder.py) to embed with instead
    of the default all-MiniLM-L6-v2; `history_weight`: how much an earlier turn counts (times
    itself per turn further back)."""

    config_fields = Router.config_fields + ("history_weight", "encoder")

    # 0.15: on two-turn conversations whose second turn stands alone (evals/results/routers/table.md)
    # the validation parts of train prefer 0 and lose 0.2-0.4 pp at 0.15, 0.3-0.6 pp at 0.3; a small
    # weight still lets a vague follow-up lean on the conversation.
    def __init__(self, embed: EmbedFn | None = None, history_weight: float = 0.15, encoder: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.history_weight = history_weight
        self.encoder = str(encoder) if encoder else None
        self.embed = embed or (encoder_embed(self.encoder) if self.encoder else default_embed)

    @property
    def embedder_name(self) -> str | None:
        return embedder_name(self.embed)

    def scores(self, texts: list[str], embeddings: np.ndarray | None = None,
               history: History | None = None) -> tuple[np.ndarray, list[str]]:
        vectors = self.embed(texts) if embeddings is None else embeddings
        vectors = self.with_history(np.asarray(vectors, dtype=np.float32), history)
        return self.scores_from_embeddings(vectors, texts)

    def with_history(self, vectors: np.ndarray, history: History | None) -> np.ndarray:
        """The query vectors with their earlier turns mixed in (`mix_history`)."""
        if not history or self.history_weight <= 0 or not any(history):
            return vectors
        flat = [turn for turns in history for turn in turns]
        embedded = np.asarray(self.embed(flat), dtype=np.float32)
        bounds = np.cumsum([0] + [len(turns) for turns in history])
        return mix_history(vectors, [embedded[a:b] for a, b in itertools.pairwise(bounds)], self.history_weight)

    def _fit(self, data: OutcomeData, embeddings: np.ndarray | None) -> None:
        vectors = self.embed(data.texts) if embeddings is None else embeddings
        self.fit_embeddings(data, np.asarray(vectors, dtype=np.float32))

    @abstractmethod
    def fit_embeddings(self, data: OutcomeData, vectors: np.ndarray) -> None: ...

    @abstractmethod
    def scores_from_embeddings(self, vectors: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, list[str]]: ...


def embedder_name(embed: EmbedFn) -> str:
    """An embed function's `embedder_name`, else its own name (a test's stand-in)."""
    return getattr(embed, "embedder_name", None) or getattr(embed, "__qualname__", type(embed).__name__)


class SharedEmbed:
    """The process's shared embedder (routers/embedder.py), or a fine-tuned encoder folder's
    (`encoder`, ONNX int8 like the default), as an embed function named after its embedder;
    `cached`: through its on-disk cache (offline runs that embed thousands of texts)."""

    def __init__(self, cached: bool = False, encoder: str | None = None):
        self.cached = cached
        self.encoder = encoder

    def embedder(self):
        from routers.embedder import embedder_at, shared_embedder

        return embedder_at(self.encoder) if self.encoder else shared_embedder()

    @property
    def embedder_name(self) -> str:
        return self.embedder().name

    def __call__(self, texts: list[str]) -> np.ndarray:
        embedder = self.embedder()
        return embedder.embed_cached(texts) if self.cached else embedder.embed(texts)


default_embed = SharedEmbed()


def encoder_embed(folder: str) -> EmbedFn:
    """Embeddings from a fine-tuned query encoder folder."""
    return SharedEmbed(encoder=folder)


def calibrate_cost_threshold(scores: np.ndarray, costs: np.ndarray, target_share: float) -> float:
    """The cost threshold at which `target_share` of these rows route to the most expensive expert(s).

    The top expert is kept exactly on rows where it leads every cheaper expert by more than the
    threshold, so the share falls as the threshold rises; the threshold is the matching quantile of
    those leads (RouteLLM calibrates its threshold the same way). A target above the share at
    threshold 0 is unreachable: the answer is then 0, the most the router sends there.
    """
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target share {target_share} is not in [0, 1]")
    scores = np.asarray(scores, dtype=np.float64)
    top = costs >= costs.max()
    if top.all() or not len(scores):
        return 0.0
    best = scores.max(axis=1)
    lead = np.where(scores[:, top].max(axis=1) >= best, best - scores[:, ~top].max(axis=1), -np.inf)
    leads = np.sort(lead)[::-1]
    wanted = int(round(target_share * len(leads)))
    if wanted >= np.sum(leads > 0):
        return 0.0
    if wanted == 0:
        return float(max(leads[0], 0.0))
    return float(max((leads[wanted - 1] + leads[wanted]) / 2, 0.0))
