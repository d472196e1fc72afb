"""Symbolic-MoE: route by the skills a query needs and each model's competence on those skills.

Fitting builds a skill vocabulary from the data (category names plus keywords mined from the
training questions: frequent enough to profile, rare enough to be specific, and chosen where the
models' accuracies differ most from their overall ones), tags every training query with skills,
and profiles each model: its accuracy on the queries of each skill, smoothed toward its overall
accuracy. Skills an expert declares (its catalog `skills`, in `OutcomeData.expert_skills`) join
the vocabulary, and its profile credits them: `skill_credit` pseudo-queries answered right by each
expert that declares the skill and wrong by the others, so an expert is routable by its skills
with few or no examples (zero-data start; 20 outweighs the smoothing toward the expert's share of
the examples, and hundreds of examples outweigh the credit). A query is scored by its skills' profiles; the top k models are recruited (k = 3 by
default) and their answers fused by a weighted vote; the model best at synthesis (the best
overall, as the data has no aggregation outcomes) is named as the aggregator in the explanation.

Skills come from one of two extractors behind one interface:
- `embedding` (default, fast): the vocabulary skills nearest to the query embedding;
- `llm`: a catalog expert writes keywords (cached on disk), each mapped to its nearest vocabulary
  skill. About 1-3 s per query on a CPU, so offline runs bound it to a sample. Profiles are always
  built with the embedding extractor: both extractors speak the same vocabulary.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Protocol

import numpy as np

from routers.base import EmbeddingRouter, EmbedFn, OutcomeData
from routers.llm_writer import CachedLLMWriter, TextGenerator

STOPWORDS = frozenset("""
a about above after again against all also although among an and another answer any are around as at
be because been before being below between both but by can cannot could did does doing done down
during each either else enough even every following for from further given had has have having he
her here hers him his how however i if in into is it its itself just least less let like made make
many may me might more most much must my neither no nor not now of off often on once one only or
other others our out over own per perhaps rather same she should since so some such than that the
their them then there therefore these they this those though through thus to too under until upon
us very was we were what when where whether which while who whom whose why will with within without
would yet you your true false correct incorrect statement statements question questions option
options choose best describe describes described following value values using used use called
known number numbers first second third time times each three four five many type types
""".split())

WORD = re.compile(r"[a-z][a-z\-]{3,}")
SKILL_PROMPT = "{question}\n\nWhich subject and skills does this question test? Reply with three keywords separated by commas, nothing else."


def mine_keywords(texts: list[str], outcomes: np.ndarray, prior: np.ndarray, count: int,
                  min_share: float = 0.002, max_share: float = 0.05) -> list[str]:
    """Keywords whose questions show the models' accuracies most unlike their overall ones."""
    docs = [set(WORD.findall(t.lower())) - STOPWORDS for t in texts]
    frequency = Counter(w for d in docs for w in d)
    low, high = max(5, min_share * len(docs)), max(6, max_share * len(docs))
    candidates = sorted(w for w, n in frequency.items() if low <= n <= high)
    if not candidates:
        return []
    column = {w: i for i, w in enumerate(candidates)}
    member = np.zeros((len(docs), len(candidates)), dtype=np.float32)
    for row, words in enumerate(docs):
        member[row, [column[w] for w in words if w in column]] = 1.0
    filled = np.where(np.isnan(outcomes), prior[None, :], outcomes)
    per_keyword = (member.T @ filled) / member.sum(axis=0)[:, None]  # (keywords, experts)
    informative = np.sqrt(member.sum(axis=0)) * (per_keyword - prior[None, :]).std(axis=1)
    return [candidates[i] for i in np.argsort(-informative, kind="stable")[:count]]


class SkillExtractor(Protocol):
    name: str

    def weights(self, texts: list[str], vectors: np.ndarray, skill_vectors: np.ndarray, embed: EmbedFn) -> np.ndarray:
        """(queries, skills) non-negative weights, each row summing to 1."""
        ...


def _nearest_skills(vectors: np.ndarray, skill_vectors: np.ndarray, top: int) -> np.ndarray:
    similarity = vectors @ skill_vectors.T
    top = min(top, skill_vectors.shape[0])
    keep = np.argpartition(-similarity, top - 1, axis=1)[:, :top]
    weights = np.zeros_like(similarity)
    rows = np.arange(len(vectors))[:, None]
    weights[rows, keep] = np.clip(similarity[rows, keep], 1e-3, None)
    return weights / weights.sum(axis=1, keepdims=True)


class EmbeddingSkills:
    """The vocabulary skills nearest to the query embedding."""

    name = "embedding"

    def __init__(self, top_skills: int = 5, llm: TextGenerator | None = None):
        self.top_skills = top_skills

    def weights(self, texts, vectors, skill_vectors, embed):
        return _nearest_skills(vectors, skill_vectors, self.top_skills)


class LLMSkills:
    """Keywords written by a catalog expert, each mapped to its nearest vocabulary skill."""

    name = "llm"

    def __init__(self, top_skills: int = 5, llm: TextGenerator | None = None):
        self.top_skills = top_skills
        self.writer = CachedLLMWriter("skills", SKILL_PROMPT, max_tokens=20, generate=llm)
        self.fallback = EmbeddingSkills(top_skills)

    def weights(self, texts, vectors, skill_vectors, embed):
        written = self.writer.write(texts)
        keywords = [[k.strip(" .\"'") for k in re.split(r"[,;\n]", w) if k.strip(" .\"'")][:self.top_skills] for w in written]
        flat = [k for ks in keywords for k in ks]
        weights = self.fallback.weights(texts, vectors, skill_vectors, embed)  # rows the LLM left empty
        if flat:
            nearest = _nearest_skills(embed(flat), skill_vectors, 1)
            start = 0
            for row, ks in enumerate(keywords):
                if ks:
                    weights[row] = nearest[start : start + len(ks)].sum(axis=0) / len(ks)
                start += len(ks)
        return weights


EXTRACTORS = {"embedding": EmbeddingSkills, "llm": LLMSkills}


class SymbolicRouter(EmbeddingRouter):
    name = "symbolic"
    config_fields = EmbeddingRouter.config_fields + (
        "extractor_name", "top_skills", "keywords", "smoothing", "aggregator_expert", "skills", "skill_credit")
    helpers = ("llm",)
    array_fields = EmbeddingRouter.array_fields + ("skill_vectors", "profiles")

    def __init__(self, k: int = 3, extractor: str = "embedding", top_skills: int = 5, keywords: int = 200,
                 smoothing: float = 10.0, aggregator_expert: str | None = None, skill_credit: float = 20.0,
                 llm: TextGenerator | None = None, **kwargs):
        super().__init__(k=k, **kwargs)
        self.top_skills = top_skills
        self.llm = llm  # writes the skills with the `llm` extractor (handed in: routers start no model)
        self.use_extractor(extractor)
        self.keywords = keywords
        self.smoothing = smoothing
        self.skill_credit = skill_credit
        self.aggregator_expert = aggregator_expert
        self.skills: list[str] = []
        self.skill_vectors = np.zeros((0, 0), dtype=np.float32)
        self.profiles = np.zeros((0, 0))  # (skills, experts)

    def use_extractor(self, name: str) -> None:
        """Switch how query skills are extracted; profiles stay (both speak the same vocabulary)."""
        if name not in EXTRACTORS:
            from core.errors import unknown

            raise unknown("skill extractor", name, EXTRACTORS)
        self.extractor_name = name
        self.extractor: SkillExtractor = EXTRACTORS[name](self.top_skills, self.llm)

    def fit_embeddings(self, data: OutcomeData, vectors: np.ndarray) -> None:
        categories = sorted(set(data.categories or []))
        mined = mine_keywords(data.texts, data.outcomes, self.prior, self.keywords)
        declared = {e: list(dict.fromkeys(s.strip().lower() for s in data.expert_skills.get(e, []) if s.strip()))
                    for e in self.experts}
        self.skills = list(dict.fromkeys([c.replace("_", " ").replace("-", " ") for c in categories]
                                         + [s for skills in declared.values() for s in skills] + mined))
        self.skill_vectors = np.asarray(self.embed(self.skills), dtype=np.float32)
        # Profiles always come from the fast extractor: the LLM one is bounded to samples.
        weights = EmbeddingSkills(self.top_skills).weights(data.texts, vectors, self.skill_vectors, self.embed)
        observed = ~np.isnan(data.outcomes)
        correct = weights.T @ np.where(observed, data.outcomes, 0.0)
        answered = weights.T @ observed
        for column, expert in enumerate(self.experts):
            for skill in declared[expert]:
                correct[self.skills.index(skill), column] += self.skill_credit
        claimed = [self.skills.index(s) for s in dict.fromkeys(s for skills in declared.values() for s in skills)]
        answered[claimed] += self.skill_credit
        self.profiles = (correct + self.smoothing * self.prior) / (answered + self.smoothing)
        if self.aggregator_expert is None:
            self.aggregator_expert = self.experts[int(np.argmax(self.prior))]

    def scores_from_embeddings(self, vectors: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        weights = self.extractor.weights(texts or [""] * len(vectors), vectors, self.skill_vectors, self.embed)
        scores = weights @ self.profiles
        explanations = []
        for row in range(len(vectors)):
            top_skills = [self.skills[i] for i in np.argsort(-weights[row])[: min(3, self.top_skills)] if weights[row, i] > 0]
            recruited = [self.experts[i] for i in np.argsort(-scores[row], kind="stable")[: self.k]]
            why = f"skills {', '.join(top_skills)} ({self.extractor_name}) recruit {', '.join(recruited)}"
            if self.k > 1:
                why += f"; aggregator {self.aggregator_expert} (best overall; no aggregation outcomes), {self.aggregator}"
            explanations.append(why)
        return scores, explanations

    def set_state(self, config, arrays):
        super().set_state(config, arrays)
        self.use_extractor(self.extractor_name)
