"""The Router protocol and what every router shares: outcome data, ranking, save and load.

A router is fitted on outcome data (query texts with a per-expert score in [0, 1], missing where
an expert did not answer) and routes a batch of query texts to Decisions. Fitted state saves to a
directory as JSON and .npz (never pickle).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.types import Decision, ExpertScore


@dataclass
class OutcomeData:
    """Rows of queries with per-expert outcomes; NaN marks an expert that did not answer."""

    texts: list[str]
    experts: list[str]
    outcomes: np.ndarray  # shape (len(texts), len(experts)), float
    categories: list[str] | None = None
    ids: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.outcomes = np.asarray(self.outcomes, dtype=np.float64)
        if self.outcomes.shape != (len(self.texts), len(self.experts)):
            raise ValueError(f"outcomes shape {self.outcomes.shape} does not match {len(self.texts)} texts x {len(self.experts)} experts")


class Router(ABC):
    """Subclasses implement `fit`, `scores` and the state they save; ranking lives here once."""

    name: str = "router"

    def __init__(self, k: int = 1, aggregator: str = "passthrough"):
        self.k = k
        self.aggregator = aggregator
        self.experts: list[str] = []

    @abstractmethod
    def fit(self, data: OutcomeData) -> Router: ...

    @abstractmethod
    def scores(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        """Predicted success per (query, expert), shape (n, len(self.experts)), and an explanation per query."""

    def route(self, texts: list[str], query_ids: list[str] | None = None, policy: str | None = None) -> list[Decision]:
        if not self.experts:
            raise RuntimeError(f"router {self.name!r} is not fitted")
        query_ids = query_ids or [str(i) for i in range(len(texts))]
        scores, explanations = self.scores(texts)
        decisions = []
        for qid, row, why in zip(query_ids, scores, explanations):
            order = np.argsort(-row, kind="stable")
            ranked = [ExpertScore(expert=self.experts[j], score=round(float(row[j]), 4)) for j in order]
            decisions.append(
                Decision(query_id=qid, policy=policy or self.name, ranked=ranked,
                         k=min(self.k, len(ranked)), aggregator=self.aggregator, explanation=why)
            )
        return decisions

    # -- persistence: config JSON + arrays NPZ ----------------------------------------------

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"experts": self.experts, "k": self.k, "aggregator": self.aggregator}, {}

    def set_state(self, config: dict, arrays: dict[str, np.ndarray]) -> None:
        self.experts = list(config["experts"])
        self.k = config["k"]
        self.aggregator = config["aggregator"]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config, arrays = self.state()
        (directory / "router.json").write_text(json.dumps({"router": self.name, **config}, indent=2))
        np.savez(directory / "arrays.npz", **arrays)

    @classmethod
    def load(cls, directory: str | Path, **kwargs) -> Router:
        directory = Path(directory)
        config = json.loads((directory / "router.json").read_text())
        with np.load(directory / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        router = cls(**kwargs)
        router.set_state(config, arrays)
        return router
