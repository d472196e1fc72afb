"""The real pipeline over replay experts: one expert per model of an outcome data set, routers
fitted on its train split, answering its test split from the recorded trace.

    pipeline, test_ids = replay_pipeline("mmlu_pro", ["knn", "symbolic"])

Policies are the routers of the seeds' table (REPLAY_POLICIES), with the options tuned on the
validation split in evals/results/routers/<data set>.json where that file has them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from core.catalog import Catalog, ExpertSpec, RecordedWeights
from core.errors import CoeError, unknown
from evals.outcomes import API_DEFAULT_ACTIVE_PARAMS_B, OutcomeSet, load_outcomes, spread_rows
from evals.router_eval import embeddings_for, make_router
from experts.backends import build_backend
from experts.backends.replay import Trace, fixed_wrong_choice
from routers.base import OutcomeData

BYTES_PER_PARAM = 1  # FP8 weights, as H100s serve them (bf16 would not fit the 398B Jamba on 8 x H100)
TUNED = Path(__file__).resolve().parent / "results" / "routers"

# policy -> (router, k); Symbolic-MoE recruits 3 experts and fuses them by weighted vote.
REPLAY_POLICIES: dict[str, tuple[str, int]] = {
    "single_best": ("single_best", 1), "coe": ("coe", 1), "symbolic": ("symbolic", 3), "glider": ("glider", 1),
    "knn": ("knn", 1), "random": ("random", 1), "oracle": ("oracle", 1),
}


def expert_name(model: str) -> str:
    """A catalog-safe expert name for a model name (lower case; `/` and spaces become `-`)."""
    return re.sub(r"[^a-z0-9._-]+", "-", model.lower()).strip("-")[:64]


def _size_table(dataset: str) -> dict:
    from core.paths import data_dir
    from evals.outcomes import DATASETS

    spec = DATASETS.get(dataset)
    return json.loads((data_dir() / spec.models).read_text()) if spec and spec.models else {}


def undisclosed_models(dataset: str, models: list[str]) -> list[str]:
    """Models whose size neither the data nor the model cards give: they cost API_DEFAULT_ACTIVE_PARAMS_B."""
    from evals.outcomes import KNOWN_ACTIVE_PARAMS_B

    table = _size_table(dataset)
    return [m for m in models if not table.get(m, {}).get("active_params_b") and m not in KNOWN_ACTIVE_PARAMS_B]


def model_sizes(dataset: str, models: list[str]) -> dict[str, tuple[float | None, float]]:
    """(total, active) parameters per model, in billions; undisclosed API models have no total
    (nothing to load: a hosted model) and the default cost."""
    from evals.outcomes import KNOWN_ACTIVE_PARAMS_B

    table = _size_table(dataset)
    sizes = {}
    for m in models:
        info = table.get(m, {})
        active = info.get("active_params_b") or KNOWN_ACTIVE_PARAMS_B.get(m) or API_DEFAULT_ACTIVE_PARAMS_B
        disclosed = info.get("params_b") or info.get("active_params_b") or KNOWN_ACTIVE_PARAMS_B.get(m)
        sizes[m] = (info.get("params_b") or disclosed, active)
    return sizes


def replay_catalog(dataset: str, data: OutcomeSet, default_model: str) -> Catalog:
    sizes = model_sizes(dataset, data.data.experts)
    # A hosted API model (size undisclosed) holds no memory here: 1 byte, so its loads cost nothing.
    experts = [
        ExpertSpec(name=expert_name(m), kind="base", weights=RecordedWeights(trace=dataset, model=m),
                   size_bytes=int(sizes[m][0] * 1e9 * BYTES_PER_PARAM) if sizes[m][0] else 1, params=int(sizes[m][1] * 1e9),
                   description=f"replay of {m}'s recorded answers on {dataset}" + ("" if sizes[m][0] else " (a hosted API model)"),
                   tasks=["general"])
        for m in data.data.experts
    ]
    return Catalog(experts=experts, default_expert=expert_name(default_model))


def renamed(data: OutcomeData) -> OutcomeData:
    return OutcomeData(texts=data.texts, experts=[expert_name(e) for e in data.experts], outcomes=data.outcomes,
                       categories=data.categories, ids=data.ids)


def tuned_options(dataset: str, router: str, k: int, tuned: Path | None = TUNED) -> dict:
    """The options tuned on the validation split by evals.run_router_table, where it saved them
    (`tuned`: the directory of its results; None: the router's constructor defaults)."""
    if tuned is None:
        return {"k": k} if k > 1 else {}
    path = tuned / f"{dataset}.json"
    result = table_result(json.loads(path.read_text()), router, k) if path.is_file() else None
    return dict(result["options"]) if result else ({"k": k} if k > 1 else {})


def table_result(results: list[dict], router: str, k: int) -> dict | None:
    """The router table's result for `router` at `k` over the shared embedder, the one replay
    routes with (not a variant over another encoder, such as `knn (dc encoder)`)."""
    return next((r for r in results if r["router"] == router and r["k"] == k and not r["options"].get("encoder")), None)


class LookupEmbed:
    """Embeddings of known texts from a table (computed once, cached on disk); others through the
    disk cache too (a batch's texts would miss it: the cache is keyed by chunk)."""

    def __init__(self, texts: list[str], vectors: np.ndarray):
        self.row = {t: i for i, t in enumerate(texts)}
        self.vectors = vectors

    def __call__(self, texts: list[str]) -> np.ndarray:
        if all(t in self.row for t in texts):
            return self.vectors[[self.row[t] for t in texts]]
        from evals.router_eval import cached_embed

        return cached_embed(texts)


def trace_disagreements(recorded: OutcomeSet) -> dict:
    """Where the recorded letters disagree with the recorded outcomes: replay scores the letter,
    offline evaluation the outcome, so a k = 1 router that picks the same experts in both can
    differ by at most `questions_with_disagreement` answers."""
    if recorded.preds is None or recorded.gold is None:
        return {"pairs_with_letter": 0, "disagreeing_pairs": 0, "questions_with_disagreement": 0}
    gold = np.array(recorded.gold, dtype=object)[:, None]
    has_letter = np.vectorize(lambda p: p is not None, otypes=[bool])(recorded.preds)
    disagree = has_letter & ((recorded.preds == gold) != (recorded.data.outcomes >= 0.5))
    return {"pairs_with_letter": int(has_letter.sum()), "disagreeing_pairs": int(disagree.sum()),
            "questions_with_disagreement": int(disagree.any(axis=1).sum())}


def load_trace(name: str) -> Trace:
    """The recorded answer letters of an outcome data set, for the replay backend."""
    recorded = load_outcomes(name)
    data = recorded.data
    if recorded.gold is None:
        raise CoeError(f"outcome data {name!r} records no answers to replay",
                       "replay needs recorded predictions or gold answers (mmlu_pro has both)")
    letters = np.empty(data.outcomes.shape, dtype=object)
    for row, gold in enumerate(recorded.gold):
        for column in range(len(data.experts)):
            predicted = recorded.preds[row, column] if recorded.preds is not None else None
            if predicted is None:
                correct = data.outcomes[row, column] >= 0.5  # NaN (did not answer) compares False
                predicted = gold if correct else fixed_wrong_choice(gold)
            letters[row, column] = predicted
    row_of_text: dict[str, int] = {}
    for row, text in enumerate(data.texts):
        row_of_text.setdefault(text, row)
    return Trace(models=list(data.experts), letters=letters, row_of_id={i: r for r, i in enumerate(data.ids)},
                 row_of_text=row_of_text)


def replay_pipeline(dataset: str, policies: list[str], default_policy: str | None = None, tiers: dict | None = None,
                    progress: bool = False, validation: bool = False, tuned: Path | None = TUNED,
                    train_limit: int | None = None):
    """A Pipeline of replay experts with the given policies fitted on `dataset`'s train split;
    returns it and the ids of the test split (the questions it may be evaluated on). With
    `validation`, the routers are fitted on train less its validation part and the ids are that
    part's (for choosing a setting without looking at test). `tiers`: ReplayBackend options
    (device_bytes, host_bytes, host_to_device_gbps, disk_to_host_gbps); `tuned`: where the router
    table saved the routers' tuned options (None: their constructor defaults); `train_limit`: fit on this many training questions,
    evenly spread (evals.outcomes.spread_rows), for small runs. No prefetch: with nothing to
    compute there is nothing to overlap, and the accounting stays deterministic."""
    from orchestrator.pipeline import Pipeline

    for policy in policies:
        if policy not in REPLAY_POLICIES:
            raise unknown("replay policy", policy, REPLAY_POLICIES)
    train, test = load_outcomes(f"{dataset}:train"), load_outcomes(f"{dataset}:test")
    if validation:
        held = train.validation_mask()
        train, test = train.take(np.flatnonzero(~held)), train.take(np.flatnonzero(held))
    train = train.take(spread_rows(len(train.data.ids), train_limit))
    train_vectors, test_vectors = embeddings_for(train, progress), embeddings_for(test, progress)
    embed = LookupEmbed(train.data.texts + test.data.texts, np.vstack([train_vectors, test_vectors]))
    costs = {expert_name(m): c for m, c in train.cost_table.items()}
    train_data, test_data = renamed(train.data), renamed(test.data)

    routers = {}
    for policy in policies:
        router_name, k = REPLAY_POLICIES[policy]
        options = tuned_options(dataset, router_name, k, tuned)
        router = make_router(router_name, options, costs)
        if hasattr(router, "embed"):
            router.embed = embed
        router.fit(train_data, train_vectors)
        if router_name == "oracle":
            router.reveal(test_data)
        routers[policy] = router
    best_model = train.data.experts[int(np.argmax(train.data.expert_means()))]
    catalog = replay_catalog(dataset, train, best_model)
    backend = build_backend("replay", catalog, traces={dataset: load_trace(dataset)}, **(tiers or {}))
    pipeline = Pipeline(catalog, backend, routers, default_policy or policies[0], prefetch=False)
    return pipeline, set(test.data.ids)
