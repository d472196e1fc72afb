"""GLIDER: a global router on the query's task instruction plus a local router on token states.

Global: a task instruction for the query (written by a catalog expert with `instruction="llm"`,
cached on disk and bounded to samples on a CPU; by default the query itself stands in for it) is
embedded and compared (cosine) with each expert's task embedding: the mean embedding of the
training queries the expert handles best (right where the others are not), or the embedding of
its catalog description where `descriptions` names one.

Local (PHATGOOSE-style, `local_weight` > 0): one logistic gate vector per expert, trained on the
hidden states of the shared base model at `gate_layer` for the tokens of each expert's best-handled
training queries; a query's local score is the mean sigmoid gate over its tokens. This is real
for a pool of LoRA adapters on one base (the embedded SmolLM2 pool). Models of outcome data
(MMLU-Pro, LLMRouter, RouteLLM) are not adapters of one base, so there is nothing to gate: keep
`local_weight` at 0 there.

The two affinities are mixed by `local_weight` and turned into predicted success with one
least-squares slope fitted on the training outcomes: success = overall accuracy + slope x
(affinity - the expert's mean affinity). Where affinity says nothing about outcomes the slope is ~0
and the router stays with the single best expert. A query whose best cosine is below
`min_similarity` goes to the fallback expert.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from routers.base import EmbeddingRouter, OutcomeData
from routers.linear import LinearModel, train_logistic
from routers.llm_writer import CachedLLMWriter, TextGenerator

TokenStateFn = Callable[[list[str], int], list[np.ndarray]]  # texts, layer -> (tokens, hidden) states of the base

INSTRUCTION_PROMPT = "{question}\n\nDescribe in one short sentence what task this question asks you to do."
GATE_TOKENS_PER_QUERY = 16  # tokens sampled per training query: keeps gate training small


def handled_best(outcomes: np.ndarray) -> np.ndarray:
    """(queries, experts) weights: how much better than the average expert each expert did."""
    with np.errstate(invalid="ignore"):
        advantage = outcomes - np.nanmean(outcomes, axis=1, keepdims=True)
    return np.clip(np.nan_to_num(advantage, nan=0.0), 0.0, None)


class GliderRouter(EmbeddingRouter):
    name = "glider"
    config_fields = EmbeddingRouter.config_fields + (
        "instruction", "local_weight", "min_similarity", "descriptions", "gate_layer", "gate_examples", "base_expert", "slope")
    helpers = ("llm", "token_states")
    array_fields = EmbeddingRouter.array_fields + ("task_vectors", "affinity_mean")
    model_fields = ("gates",)

    def __init__(self, instruction: str = "query", local_weight: float = 0.0, min_similarity: float = 0.0,
                 descriptions: dict[str, str] | None = None, gate_layer: int = 10, gate_examples: int = 64,
                 base_expert: str | None = None, token_states: TokenStateFn | None = None, llm: TextGenerator | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.use_extractor(instruction)
        self.local_weight = local_weight
        self.min_similarity = min_similarity
        self.descriptions = dict(descriptions or {})
        self.gate_layer = gate_layer
        self.gate_examples = gate_examples
        self.base_expert = base_expert
        # Handed in (routers start no model): base-model token states for the local gates, an LLM
        # for written instructions; experts/helpers.py builds both on a backend.
        self.token_states = token_states
        self.writer = CachedLLMWriter("instruction", INSTRUCTION_PROMPT, max_tokens=24, generate=llm)
        self.task_vectors = np.zeros((0, 0), dtype=np.float32)
        self.gates: LinearModel | None = None
        self.affinity_mean = np.zeros(0)
        self.slope = 0.0

    def use_extractor(self, name: str) -> None:
        """Switch what stands for the query's instruction: the query itself, or an LLM-written one."""
        if name not in ("query", "llm"):
            from core.errors import unknown

            raise unknown("instruction source", name, ["query", "llm"])
        self.instruction = name

    # -- fitting ----------------------------------------------------------------------------

    def fit_embeddings(self, data: OutcomeData, vectors: np.ndarray) -> None:
        handled = handled_best(data.outcomes)
        task_vectors = handled.T @ vectors
        described = [e for e in self.experts if e in self.descriptions]
        if described:
            for expert, vector in zip(described, self.embed([self.descriptions[e] for e in described])):
                task_vectors[self.experts.index(expert)] = vector
        norms = np.linalg.norm(task_vectors, axis=1, keepdims=True)
        self.task_vectors = np.divide(task_vectors, norms, out=np.zeros_like(task_vectors), where=norms > 0).astype(np.float32)
        if self.local_weight > 0:
            self.gates = self._fit_gates(data.texts, handled)
        _, affinity = self._affinity(vectors, data.texts)  # training queries stand in for their instructions
        self.affinity_mean = affinity.mean(axis=0)
        centred = affinity - self.affinity_mean
        observed = ~np.isnan(data.outcomes)
        residual = np.where(observed, data.outcomes - self.prior, 0.0)
        spread = float((np.where(observed, centred, 0.0) ** 2).sum())
        self.slope = max(float((residual * centred).sum()) / spread, 0.0) if spread > 0 else 0.0

    def _fit_gates(self, texts: list[str], handled: np.ndarray) -> LinearModel:
        """Gates from the tokens of each expert's best-handled queries (deterministic sample)."""
        chosen = sorted({int(i) for column in handled.T for i in np.argsort(-column, kind="stable")[: self.gate_examples]
                         if column[i] > 0})
        states = self._states([texts[i] for i in chosen])
        rows, targets = [], []
        rng = np.random.default_rng(0)
        for query, tokens in zip(chosen, states):
            picked = tokens if len(tokens) <= GATE_TOKENS_PER_QUERY else tokens[rng.choice(len(tokens), GATE_TOKENS_PER_QUERY, replace=False)]
            rows.append(picked)
            targets.append(np.repeat((handled[query] > 0)[None, :].astype(float), len(picked), axis=0))
        return train_logistic(np.concatenate(rows), np.concatenate(targets))

    def _states(self, texts: list[str]) -> list[np.ndarray]:
        if self.token_states is None:
            from core.errors import CoeError

            raise CoeError("GLIDER's local gates need base-model token states and none were handed in",
                           "pass token_states (experts.helpers.BackendTokenStates) or set local_weight: 0")
        return self.token_states(texts, self.gate_layer)

    # -- scoring ----------------------------------------------------------------------------

    def instruction_vectors(self, texts: list[str], query_vectors: np.ndarray) -> np.ndarray:
        if self.instruction == "query":
            return query_vectors
        return np.asarray(self.embed(self.writer.write(texts)), dtype=np.float32)

    def _affinity(self, instruction_vectors: np.ndarray, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(global cosine, global mixed with local gates relative to the experts' mean) per query and expert."""
        global_affinity = instruction_vectors @ self.task_vectors.T
        mixed = global_affinity
        if self.local_weight > 0 and self.gates is not None:
            local = np.array([self.gates.sigmoid(tokens).mean(axis=0) for tokens in self._states(texts)])
            mixed = (1 - self.local_weight) * global_affinity + self.local_weight * local
        # Relative to the other experts: what is common to all of them (an easy-looking query)
        # says nothing about which one to call.
        return global_affinity, mixed - mixed.mean(axis=1, keepdims=True)

    def scores_from_embeddings(self, vectors: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        texts = texts or [""] * len(vectors)
        global_affinity, affinity = self._affinity(self.instruction_vectors(texts, vectors), texts)
        scores = self.prior + self.slope * (affinity - self.affinity_mean)
        far = global_affinity.max(axis=1) < self.min_similarity
        scores = self.prefer(scores, far, self.fallback)
        explanations = []
        for row in range(len(vectors)):
            nearest = int(np.argmax(global_affinity[row]))
            if far[row]:
                explanations.append(f"instruction unlike every expert's task (best cosine {global_affinity[row, nearest]:.2f} "
                                    f"< {self.min_similarity}): the general expert {self.fallback} answers")
            else:
                local = f", local gates weight {self.local_weight}" if self.gates is not None and self.local_weight > 0 else ""
                explanations.append(f"{self.instruction} instruction closest to {self.experts[nearest]}'s task "
                                    f"(cosine {global_affinity[row, nearest]:.2f}{local})")
        return scores, explanations
