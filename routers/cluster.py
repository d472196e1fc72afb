"""Cluster router (Avengers-Pro, arXiv 2508.12631): k-means on the training query embeddings, a
per-cluster ranking of the experts by accuracy and cost.

Fitting clusters the training queries (faiss k-means, cosine: spherical centroids), then measures
each expert's accuracy per cluster, shrunk toward its overall accuracy (`smoothing`
pseudo-queries), so a small cluster cannot crown an expert by luck and a cluster with no training
queries is the overall ranking. A query is scored by its `nearest` clusters (similarity-weighted).

Avengers-Pro ranks a cluster's models by alpha * accuracy + (1 - alpha) * (1 - cost), both
min-max normalised within the cluster. `alpha` = 1 (the default) is pure accuracy and the scores
are the predicted success; below 1 the scores keep the same order as Avengers-Pro's, on the
accuracy scale: accuracy + (1 - alpha) / alpha * (cluster accuracy range) * (1 - normalised cost).
"""

from __future__ import annotations

import warnings

import faiss
import numpy as np

from routers.base import EmbeddingRouter, OutcomeData, RoutingDataWarning


class ClusterRouter(EmbeddingRouter):
    name = "cluster"
    default_margin = 0.0
    config_fields = EmbeddingRouter.config_fields + ("clusters", "smoothing", "alpha", "nearest", "seed")
    array_fields = EmbeddingRouter.array_fields + ("centroids", "cluster_accuracy", "cluster_sizes")

    def __init__(self, clusters: int = 60, smoothing: float = 10.0, alpha: float = 1.0, nearest: int = 1, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < alpha <= 1.0:
            from core.errors import ConfigError

            raise ConfigError(f"cluster router alpha {alpha} is not in (0, 1]", "1 ranks by accuracy alone; lower values weigh cost in")
        self.clusters = clusters
        self.smoothing = smoothing
        self.alpha = alpha
        self.nearest = nearest
        self.seed = seed
        self.centroids = np.zeros((0, 0), dtype=np.float32)
        self.cluster_accuracy = np.zeros((0, 0))  # (clusters, experts)
        self.cluster_sizes = np.zeros(0)

    def fit_embeddings(self, data: OutcomeData, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        count = max(1, min(self.clusters, len(vectors)))
        if count < self.clusters:
            warnings.warn(f"{len(vectors)} fitting queries cannot make {self.clusters} clusters: using {count}",
                          RoutingDataWarning, stacklevel=3)
        if count == 1:
            self.centroids = vectors.mean(axis=0, keepdims=True)
        else:
            kmeans = faiss.Kmeans(vectors.shape[1], count, niter=25, seed=self.seed, spherical=True, verbose=False,
                                  min_points_per_centroid=1, max_points_per_centroid=100000)
            kmeans.train(vectors)
            self.centroids = np.asarray(kmeans.centroids, dtype=np.float32)
        assigned = np.argmax(vectors @ self.centroids.T, axis=1)
        member = np.eye(len(self.centroids))[assigned]
        observed = ~np.isnan(data.outcomes)
        correct = member.T @ np.where(observed, data.outcomes, 0.0)
        answered = member.T @ observed
        self.cluster_sizes = member.sum(axis=0)
        empty = np.flatnonzero(self.cluster_sizes == 0)
        if len(empty):
            warnings.warn(f"{len(empty)} of {len(self.centroids)} clusters have no training queries "
                          f"(clusters {', '.join(map(str, empty[:10]))}): left out; their queries get the overall ranking",
                          RoutingDataWarning, stacklevel=3)
        self.cluster_accuracy = (correct + self.smoothing * self.prior) / np.maximum(answered + self.smoothing, 1e-12)

    def cluster_scores(self) -> np.ndarray:
        """Per-cluster expert scores: accuracy, with Avengers-Pro's cost term where alpha < 1."""
        accuracy = self.cluster_accuracy
        if self.alpha >= 1.0:
            return accuracy
        costs = self.cost_vector()
        span = costs.max() - costs.min()
        cheapness = 1.0 - (costs - costs.min()) / span if span > 0 else np.ones_like(costs)
        accuracy_range = accuracy.max(axis=1, keepdims=True) - accuracy.min(axis=1, keepdims=True)
        return accuracy + (1.0 - self.alpha) / self.alpha * accuracy_range * cheapness[None, :]

    def scores_from_embeddings(self, vectors: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        similarity = np.asarray(vectors, dtype=np.float32) @ self.centroids.T
        # An empty cluster is never the nearest: its queries go to the nearest cluster with data.
        similarity = np.where(self.cluster_sizes[None, :] > 0, similarity, -np.inf)
        nearest = min(self.nearest, int((self.cluster_sizes > 0).sum()) or 1)
        top = np.argsort(-similarity, axis=1)[:, :nearest]
        weights = np.clip(np.take_along_axis(similarity, top, axis=1), 1e-6, None)
        weights = weights / weights.sum(axis=1, keepdims=True)
        per_cluster = self.cluster_scores()
        scores = np.einsum("nc,nce->ne", weights, per_cluster[top])
        explanations = []
        for row in range(len(vectors)):
            cluster = int(top[row, 0])
            best = int(np.argmax(per_cluster[cluster]))
            explanations.append(f"cluster {cluster} ({int(self.cluster_sizes[cluster])} training queries, similarity "
                                f"{similarity[row, cluster]:.2f}); best there: {self.experts[best]} "
                                f"({self.cluster_accuracy[cluster, best]:.2f}{f', alpha {self.alpha:g}' if self.alpha < 1 else ''})")
        return scores, explanations
