"""kNN router: faiss nearest neighbours over embedded training queries.

An expert's predicted success for a query is the similarity-weighted mean of its outcomes on the
query's nearest training queries. Fitted on each expert's own training examples (outcome 1 for
that expert, 0 for the others) this is a nearest-neighbour vote; fitted on recorded per-model
correctness it predicts who answers correctly.

Safe default: when even the nearest neighbour is far (below `min_similarity`), the query is
unlike anything the specialists were made for, and the fallback expert leads the ranking.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from routers.base import OutcomeData, Router

EmbedFn = Callable[[list[str]], np.ndarray]


def _default_embed(texts: list[str]) -> np.ndarray:
    from routers.embedder import shared_embedder

    return shared_embedder().embed(texts)


class KNNRouter(Router):
    name = "knn"

    def __init__(self, neighbours: int = 20, min_similarity: float = 0.3, fallback_expert: str | None = None,
                 embed: EmbedFn | None = None, **kwargs):
        super().__init__(**kwargs)
        self.neighbours = neighbours
        self.min_similarity = min_similarity
        self.fallback_expert = fallback_expert
        self.embed = embed or _default_embed
        self._index: faiss.IndexFlatIP | None = None
        self._outcomes = np.zeros((0, 0))

    def fit(self, data: OutcomeData, embeddings: np.ndarray | None = None) -> KNNRouter:
        vectors = embeddings if embeddings is not None else self.embed(data.texts)
        self.experts = list(data.experts)
        if self.fallback_expert is not None and self.fallback_expert not in self.experts:
            self.experts.append(self.fallback_expert)
            data_outcomes = np.hstack([data.outcomes, np.full((len(data.texts), 1), np.nan)])
        else:
            data_outcomes = data.outcomes
        self._build(np.asarray(vectors, dtype=np.float32), data_outcomes)
        return self

    def _build(self, vectors: np.ndarray, outcomes: np.ndarray) -> None:
        self._index = faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(np.ascontiguousarray(vectors))
        self._vectors = vectors
        self._outcomes = outcomes

    def scores(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        query_vectors = self.embed(texts)
        return self.scores_from_embeddings(query_vectors)

    def scores_from_embeddings(self, query_vectors: np.ndarray) -> tuple[np.ndarray, list[str]]:
        k = min(self.neighbours, self._index.ntotal)
        sims, idx = self._index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
        weights = np.clip(sims, 1e-6, None)[:, :, None]  # (n, k, 1)
        neighbour_outcomes = self._outcomes[idx]  # (n, k, experts)
        observed = ~np.isnan(neighbour_outcomes)
        weighted = np.where(observed, neighbour_outcomes, 0.0) * weights
        mass = (observed * weights).sum(axis=1)
        scores = np.divide(weighted.sum(axis=1), mass, out=np.zeros_like(mass), where=mass > 0)
        explanations = []
        for row in range(len(query_vectors)):
            nearest = float(sims[row, 0])
            if self.fallback_expert is not None and nearest < self.min_similarity:
                fallback = self.experts.index(self.fallback_expert)
                scores[row, fallback] = scores[row].max() + 1e-3
                explanations.append(f"nearest training query has similarity {nearest:.2f} < {self.min_similarity}: "
                                    f"no specialist fits, so the general expert {self.fallback_expert} answers")
            else:
                best = self.experts[int(np.argmax(scores[row]))]
                explanations.append(f"{k} nearest training queries (top similarity {nearest:.2f}) favour {best}")
        return scores, explanations

    def state(self):
        config, arrays = super().state()
        config.update(neighbours=self.neighbours, min_similarity=self.min_similarity, fallback_expert=self.fallback_expert)
        arrays.update(vectors=self._vectors.astype(np.float16), outcomes=self._outcomes)
        return config, arrays

    def set_state(self, config, arrays):
        super().set_state(config, arrays)
        self.neighbours = config["neighbours"]
        self.min_similarity = config["min_similarity"]
        self.fallback_expert = config["fallback_expert"]
        self._build(arrays["vectors"].astype(np.float32), arrays["outcomes"])
