"""`best`: a stacked router. Member routers (knn, cluster, mf, coe by default) each predict every
expert's success; a logistic stacker combines those predictions into one.

Fitting holds out a share of the fitting rows (`stack_share`, by a salted id hash), fits the
members on the rest, and trains the stacker on the held-out rows: one logistic model over the
members' predictions for an expert plus a bias per expert, shared by all experts (so an expert
with few outcomes borrows the others' weights). The members are then refitted on every row for
serving. The single best expert answers unless the stack predicts another expert beats it by
more than `margin`: the stack's confidence gate.

Members are saved inside the router's own state (config and arrays prefixed by member name).
"""

from __future__ import annotations

import numpy as np

from core.data import in_share
from routers.base import EmbeddingRouter, OutcomeData
from routers.linear import LinearModel, train_logistic

DEFAULT_MEMBERS = ("knn", "cluster", "mf", "coe")
MEMBER_SEPARATOR = "__"


class BestRouter(EmbeddingRouter):
    name = "best"
    default_margin = 0.02
    config_fields = EmbeddingRouter.config_fields + ("members", "member_options", "stack_share", "l2", "member_states")
    model_fields = ("stacker",)

    def __init__(self, members: list[str] | tuple[str, ...] = DEFAULT_MEMBERS, member_options: dict | None = None,
                 stack_share: float = 0.3, l2: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.members = list(members)
        self.member_options = dict(member_options or {})
        self.stack_share = stack_share
        self.l2 = l2
        self.stacker: LinearModel | None = None
        self.member_states: dict = {}
        self._members: dict = {}

    def _member(self, name: str):
        from routers import ROUTERS

        shared = {"costs": self.costs, "fallback_expert": self.fallback_expert, "margin": 0.0, "embed": self.embed}
        return ROUTERS[name](**{**shared, **self.member_options.get(name, {})})

    def _member_scores(self, vectors: np.ndarray, texts: list[str] | None) -> np.ndarray:
        """(queries, experts, members) predicted success."""
        return np.stack([self._members[m].scores_from_embeddings(vectors, texts)[0] for m in self.members], axis=2)

    def _features(self, member_scores: np.ndarray) -> np.ndarray:
        """One row per (query, expert): the members' predictions and a one-hot expert."""
        queries, experts, _ = member_scores.shape
        one_hot = np.tile(np.eye(experts), (queries, 1))
        return np.hstack([member_scores.reshape(queries * experts, -1), one_hot])

    def fit_embeddings(self, data: OutcomeData, vectors: np.ndarray) -> None:
        ids = data.ids or [str(i) for i in range(len(data.texts))]
        held = np.array([in_share("stack:" + i, self.stack_share) for i in ids], dtype=bool)
        if held.all() or not held.any():
            held = np.arange(len(ids)) % 3 == 0
        fit_rows, stack_rows = np.flatnonzero(~held), np.flatnonzero(held)
        fit_part, stack_part = data.take(fit_rows), data.take(stack_rows)
        self._members = {m: self._member(m).fit(fit_part, vectors[fit_rows]) for m in self.members}
        stacked = self._member_scores(vectors[stack_rows], stack_part.texts)
        targets = stack_part.outcomes.reshape(-1)
        observed = ~np.isnan(targets)
        self.stacker = train_logistic(self._features(stacked)[observed], targets[observed][:, None], l2=self.l2, steps=400)
        self._members = {m: self._member(m).fit(data, vectors) for m in self.members}
        self.member_states = {}

    def scores_from_embeddings(self, vectors: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        member_scores = self._member_scores(vectors, texts)
        scores = self.stacker.sigmoid(self._features(member_scores))[:, 0].reshape(len(vectors), len(self.experts))
        explanations = []
        for row in range(len(vectors)):
            best = int(np.argmax(scores[row]))
            votes = ", ".join(f"{m} {self.experts[int(np.argmax(member_scores[row, :, i]))]}" for i, m in enumerate(self.members))
            explanations.append(f"stack of {', '.join(self.members)} predicts {self.experts[best]} "
                                f"({scores[row, best]:.2f}); members' picks: {votes}")
        return scores, explanations

    # -- persistence: members' states go inside this router's config and arrays ----------------

    def state(self):
        config, arrays = super().state()
        config["member_states"] = {}
        for name, member in self._members.items():
            member_config, member_arrays = member.state()
            config["member_states"][name] = member_config
            arrays.update({f"{name}{MEMBER_SEPARATOR}{key}": value for key, value in member_arrays.items()})
        return config, arrays

    def set_state(self, config, arrays):
        super().set_state(config, arrays)
        self._members = {}
        for name in self.members:
            prefix = f"{name}{MEMBER_SEPARATOR}"
            member = self._member(name)
            member.set_state(self.member_states[name], {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
            self._members[name] = member
        self.member_states = {}
