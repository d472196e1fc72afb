"""kNN router: faiss nearest neighbours over embedded training queries.

An expert's predicted success for a query is the similarity-weighted mean of its outcomes on the
query's nearest training queries. Fitted on each expert's own training examples (outcome 1 for
that expert, 0 for the others) this is a nearest-neighbour vote; fitted on recorded per-model
correctness it predicts who answers correctly.

Safe defaults: when even the nearest neighbour is far (below `min_similarity`), the query is
unlike anything the specialists were made for, and the fallback expert leads the ranking; and
another expert must beat the fallback (the single best, unless configured) by `margin`.
"""

from __future__ import annotations

import faiss
import numpy as np

from routers.base import EmbeddingRouter, OutcomeData


class KNNRouter(EmbeddingRouter):
    name = "knn"
    default_margin = 0.05  # a 50-neighbour estimate is noisy: leave the fallback only when clearly better

    def __init__(self, neighbours: int = 50, min_similarity: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.neighbours = neighbours
        self.min_similarity = min_similarity
        self._index: faiss.IndexFlatIP | None = None
        self._outcomes = np.zeros((0, 0))

    def fit_embeddings(self, data: OutcomeData, vectors: np.ndarray) -> None:
        self._build(vectors, data.outcomes)

    def _build(self, vectors: np.ndarray, outcomes: np.ndarray) -> None:
        self._index = faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._vectors = vectors
        self._outcomes = outcomes

    def scores_from_embeddings(self, query_vectors: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        k = min(self.neighbours, self._index.ntotal)
        sims, idx = self._index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
        weights = np.clip(sims, 1e-6, None)[:, :, None]  # (n, k, 1)
        neighbour_outcomes = self._outcomes[idx]  # (n, k, experts)
        observed = ~np.isnan(neighbour_outcomes)
        weighted = np.where(observed, neighbour_outcomes, 0.0) * weights
        mass = (observed * weights).sum(axis=1)
        scores = np.divide(weighted.sum(axis=1), mass, out=np.zeros_like(mass), where=mass > 0)
        far = sims[:, 0] < self.min_similarity
        scores = self.prefer(scores, far, self.fallback)
        explanations = [
            f"nearest training query has similarity {sims[row, 0]:.2f} < {self.min_similarity}: "
            f"no specialist fits, so the general expert {self.fallback} answers" if far[row] else
            f"{k} nearest training queries (top similarity {sims[row, 0]:.2f}) favour {self.experts[int(np.argmax(scores[row]))]}"
            for row in range(len(query_vectors))
        ]
        return scores, explanations

    def state(self):
        config, arrays = super().state()
        config.update(neighbours=self.neighbours, min_similarity=self.min_similarity)
        arrays.update(vectors=self._vectors.astype(np.float16), outcomes=self._outcomes)
        return config, arrays

    def set_state(self, config, arrays):
        super().set_state(config, arrays)
        self.neighbours = config["neighbours"]
        self.min_similarity = config["min_similarity"]
        self._build(arrays["vectors"].astype(np.float32), arrays["outcomes"])
