"""Matrix-factorisation router (RouteLLM `mf`, EmbedLLM): a learned vector per expert, scored
against a learned projection of the query embedding.

    predicted success(q, e) = sigmoid( (W q) . v_e + b_e + d . q )

W (embedding dim x `dim`), the expert vectors v_e, the per-expert bias b_e and a shared
difficulty direction d (how hard the query is for every expert, so the expert vectors are left
to learn who is better where) are trained on the outcome matrix (every observed query-expert cell,
binary cross-entropy on the outcome in [0, 1]), full batch with Adam. The query side overfits
within tens of steps; what holds it (measured on MMLU-Pro's validation part) is dropout on the
query embedding, where weight decay instead shrinks the interactions to nothing and leaves the
single best. A held-out slice of the fitting rows (a fixed share, by position hash) stops
training at its best loss. Training uses torch inside `fit` (imported
there); scoring is numpy only, so a served router never loads torch.
"""

from __future__ import annotations

import hashlib

import numpy as np

from routers.base import EmbeddingRouter, OutcomeData


def holdout_rows(count: int, share: float, salt: str = "mf") -> np.ndarray:
    """A stable pseudo-random mask of `share` of `count` rows."""
    return np.array([int(hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share
                     for i in range(count)], dtype=bool)


class MFRouter(EmbeddingRouter):
    name = "mf"
    default_margin = 0.0
    config_fields = EmbeddingRouter.config_fields + ("dim", "dropout", "epochs", "learning_rate", "seed")
    array_fields = EmbeddingRouter.array_fields + ("projection", "expert_vectors", "expert_bias", "difficulty")

    def __init__(self, dim: int = 64, dropout: float = 0.5, epochs: int = 100, learning_rate: float = 1e-2,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.dropout = dropout
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.seed = seed
        self.projection = np.zeros((0, 0), dtype=np.float32)
        self.expert_vectors = np.zeros((0, 0), dtype=np.float32)
        self.expert_bias = np.zeros(0, dtype=np.float32)
        self.difficulty = np.zeros(0, dtype=np.float32)

    def fit_embeddings(self, data: OutcomeData, vectors: np.ndarray) -> None:
        import torch

        torch.manual_seed(self.seed)
        x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        outcomes = torch.as_tensor(np.nan_to_num(data.outcomes, nan=0.0), dtype=torch.float32)
        observed = torch.as_tensor(~np.isnan(data.outcomes), dtype=torch.float32)
        held = torch.as_tensor(holdout_rows(len(vectors), 0.1 if len(vectors) >= 50 else 0.0), dtype=torch.bool)
        experts = outcomes.shape[1]
        projection = torch.nn.Parameter(torch.randn(x.shape[1], self.dim) * (1.0 / np.sqrt(x.shape[1])))
        expert_vectors = torch.nn.Parameter(torch.randn(experts, self.dim) * 0.01)
        prior = torch.as_tensor(np.clip(self.prior, 1e-3, 1 - 1e-3), dtype=torch.float32)
        expert_bias = torch.nn.Parameter(torch.log(prior / (1 - prior)))
        difficulty = torch.nn.Parameter(torch.zeros(x.shape[1]))
        parameters = [projection, expert_vectors, expert_bias, difficulty]
        optimiser = torch.optim.Adam(parameters, lr=self.learning_rate)

        def loss_on(rows: torch.Tensor, training: bool = False) -> torch.Tensor:
            queries = torch.nn.functional.dropout(x[rows], self.dropout) if training else x[rows]
            logits = (queries @ projection) @ expert_vectors.T + expert_bias + (queries @ difficulty)[:, None]
            cells = torch.nn.functional.binary_cross_entropy_with_logits(logits, outcomes[rows], reduction="none")
            mask = observed[rows]
            return (cells * mask).sum() / mask.sum().clamp(min=1.0)

        train_rows, held_rows = ~held, held
        best, best_state = float("inf"), None
        for _ in range(self.epochs):
            optimiser.zero_grad()
            loss = loss_on(train_rows, training=True)
            loss.backward()
            optimiser.step()
            if held_rows.any():
                with torch.no_grad():
                    held_loss = float(loss_on(held_rows))
                if held_loss < best:
                    best = held_loss
                    best_state = [p.detach().clone() for p in parameters]
        state = best_state or [p.detach() for p in parameters]
        self.projection, self.expert_vectors, self.expert_bias, self.difficulty = (p.numpy().astype(np.float32) for p in state)

    def scores_from_embeddings(self, vectors: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        vectors = np.asarray(vectors, dtype=np.float32)
        logits = (vectors @ self.projection) @ self.expert_vectors.T + self.expert_bias + (vectors @ self.difficulty)[:, None]
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -30, 30)))
        explanations = [f"learned expert vectors favour {self.experts[int(np.argmax(row))]} "
                        f"(predicted success {row.max():.2f})" for row in scores]
        return scores, explanations
