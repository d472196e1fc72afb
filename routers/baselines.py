"""Baselines every router is measured against: random, single best, and the oracle upper bound."""

from __future__ import annotations

import hashlib

import numpy as np

from core.errors import CoeError
from routers.base import OutcomeData, Router


class RandomRouter(Router):
    """A uniformly random expert per query, repeatable: the draw depends on the text and the seed."""

    name = "random"
    predicts = False
    config_fields = Router.config_fields + ("seed",)

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def _fit(self, data: OutcomeData, embeddings: np.ndarray | None) -> None:
        pass

    def scores(self, texts: list[str], embeddings: np.ndarray | None = None, history=None) -> tuple[np.ndarray, list[str]]:
        rows = []
        for text in texts:
            digest = hashlib.sha256(f"{self.seed}\x00{text}".encode()).digest()
            rows.append(np.random.default_rng(int.from_bytes(digest[:8], "big")).random(len(self.experts)))
        return np.array(rows).reshape(len(texts), len(self.experts)), ["random draw"] * len(texts)


class SingleBestRouter(Router):
    """Every query to the expert with the best mean outcome on the fitting data."""

    name = "single_best"

    def _fit(self, data: OutcomeData, embeddings: np.ndarray | None) -> None:
        pass

    def scores(self, texts: list[str], embeddings: np.ndarray | None = None, history=None) -> tuple[np.ndarray, list[str]]:
        best = self.experts[int(np.argmax(self.prior))]
        why = f"{best} has the best mean outcome on the fitting data ({self.prior.max():.3f})"
        return np.tile(self.prior, (len(texts), 1)), [why] * len(texts)


class OracleRouter(Router):
    """The cheapest expert that answers each query correctly: an upper bound, not a router.

    It needs the outcomes of the queries it routes, given with `reveal(test_data)` before
    `route`/`scores`; where no expert is correct the cheapest expert is named (nothing is gained
    by paying more). Costs come from `costs`; without them, ties go to the first expert.
    """

    name = "oracle"
    predicts = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.revealed: dict[str, np.ndarray] = {}

    def _fit(self, data: OutcomeData, embeddings: np.ndarray | None) -> None:
        pass

    def reveal(self, data: OutcomeData) -> OracleRouter:
        columns = [data.experts.index(e) if e in data.experts else None for e in self.experts]
        for text, row in zip(data.texts, data.outcomes):
            self.revealed[text] = np.array([0.0 if c is None or np.isnan(row[c]) else row[c] for c in columns])
        return self

    def scores(self, texts: list[str], embeddings: np.ndarray | None = None, history=None) -> tuple[np.ndarray, list[str]]:
        missing = [t for t in texts if t not in self.revealed]
        if missing:
            raise CoeError(f"the oracle has no outcomes for {len(missing)} of {len(texts)} queries",
                           "call reveal(test_data) with the outcomes of the queries it routes")
        outcomes = np.array([self.revealed[t] for t in texts]).reshape(len(texts), len(self.experts))
        # Among equally good experts the cost knob at threshold 0 picks the cheapest.
        return outcomes, ["oracle: the recorded outcomes of this query"] * len(texts)
