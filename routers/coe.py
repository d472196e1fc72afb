"""Composition of Experts (SambaNova CoE): classify the query into a category, then call the
expert that is best on that category.

Two steps, both fitted on outcome data with categories (MMLU-Pro's 14 subjects, LLMRouter's
tasks, the embedded pool's expert tasks):
1. a softmax-regression category classifier on the query embedding;
2. a category -> expert map from each expert's per-category accuracy on the fitting data, shrunk
   toward its overall accuracy (`smoothing` pseudo-queries), so a small category cannot crown an
   expert by luck. An expert's predicted success is its map accuracy averaged over the
   classifier's category probabilities.

When the classifier is unsure (top probability below `min_confidence`) the general expert
answers: the configured fallback, else the single best expert. Trading accuracy for cost per
category is the base cost knob: with `cost_threshold` the cheapest expert within it of the best
predicted accuracy answers.
"""

from __future__ import annotations

import numpy as np

from routers.base import EmbeddingRouter, OutcomeData
from routers.linear import LinearModel, train_softmax


class CoERouter(EmbeddingRouter):
    name = "coe"
    default_margin = 0.02

    def __init__(self, min_confidence: float = 0.4, smoothing: float = 20.0, l2: float = 1e-2, **kwargs):
        super().__init__(**kwargs)
        self.min_confidence = min_confidence
        self.smoothing = smoothing
        self.l2 = l2
        self.categories: list[str] = []
        self.category_accuracy = np.zeros((0, 0))  # (categories, experts)
        self.classifier: LinearModel | None = None

    def fit_embeddings(self, data: OutcomeData, vectors: np.ndarray) -> None:
        if data.categories is None:
            raise ValueError("the coe router needs categories in its fitting data")
        self.categories = sorted(set(data.categories))
        labels = np.array([self.categories.index(c) for c in data.categories])
        self.classifier = train_softmax(vectors, labels, len(self.categories), l2=self.l2)
        observed = ~np.isnan(data.outcomes)
        outcomes = np.where(observed, data.outcomes, 0.0)
        member = np.eye(len(self.categories))[labels]  # (rows, categories)
        correct = member.T @ outcomes
        answered = member.T @ observed
        self.category_accuracy = (correct + self.smoothing * self.prior) / (answered + self.smoothing)

    def scores_from_embeddings(self, vectors: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        probabilities = self.classifier.softmax(vectors)
        scores = probabilities @ self.category_accuracy
        confidence = probabilities.max(axis=1)
        unsure = confidence < self.min_confidence
        scores = self.prefer(scores, unsure, self.fallback)
        explanations = []
        for row, category in enumerate(probabilities.argmax(axis=1)):
            name = self.categories[category]
            if unsure[row]:
                explanations.append(f"category unsure (best guess {name!r} at p={confidence[row]:.2f} < "
                                    f"{self.min_confidence}): the general expert {self.fallback} answers")
            else:
                best = int(np.argmax(self.category_accuracy[category]))
                explanations.append(f"category {name!r} (p={confidence[row]:.2f}); best there on validation: "
                                    f"{self.experts[best]} ({self.category_accuracy[category, best]:.2f})")
        return scores, explanations

    def state(self):
        config, arrays = super().state()
        config.update(min_confidence=self.min_confidence, smoothing=self.smoothing, l2=self.l2, categories=self.categories)
        arrays.update(category_accuracy=self.category_accuracy, **self.classifier.arrays("classifier"))
        return config, arrays

    def set_state(self, config, arrays):
        super().set_state(config, arrays)
        self.min_confidence = config["min_confidence"]
        self.smoothing = config["smoothing"]
        self.l2 = config["l2"]
        self.categories = config["categories"]
        self.category_accuracy = arrays["category_accuracy"]
        self.classifier = LinearModel.from_arrays(arrays, "classifier")
