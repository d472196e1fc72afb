"""Recorded per-model outcomes from ../shared/data/routing, as router fitting and test data.

A data set is named `NAME[:train|:test]` (NAME from DATASETS) or by a path `file.jsonl[:train|:test]`
in any of the outcome file formats (routers/outcome_files.py reads them all: per-query outcomes,
per-(query, expert) scores, pairwise preferences). Where a set has no split of its own, a stable
hash of the question id puts 30% in test.

Rules, applied the same way to fitting and evaluation:
- A model missing from a row of the outcomes format did not answer that question: its outcome is
  0 (a call that gives no answer is a failed call). In MMLU-Pro this is DeepSeek-Coder-V2 on 1,142
  questions, nearly all in engineering and chemistry.
- Cost of a call = the model's active parameters in billions (`active_params_b` of
  mmlu_pro_models.json, or KNOWN_ACTIVE_PARAMS_B from the model cards). API models whose size is
  undisclosed cost API_DEFAULT_ACTIVE_PARAMS_B: more than any open model in these files, so a
  router never looks cheaper by calling one. A JSON file {model: cost} overrides any of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.data import in_share, read_jsonl
from core.errors import CoeError
from core.paths import data_dir
from routers.base import OutcomeData
from routers.outcome_files import OutcomeFile, read_outcome_files

TEST_SHARE = 0.3
VALIDATION_SHARE = 0.2  # of train, for tuning; drawn with a different hash salt than test

API_DEFAULT_ACTIVE_PARAMS_B = 200.0

# Model cards (billions of parameters active per token), for files that do not carry sizes.
KNOWN_ACTIVE_PARAMS_B = {
    "llama3-chatqa-1.5-8b": 8.0,
    "llama3-chatqa-1.5-70b": 70.6,
    "qwen2.5-7b-instruct": 7.6,
    "llama-3.1-nemotron-51b-instruct": 51.5,
    "llama-3.3-nemotron-super-49b-v1": 49.9,
    "mistral-7b-instruct-v0.3": 7.2,
    "gemma-2-9b-it": 9.2,
    "llama-3.1-8b-instruct": 8.0,
    "codegemma-7b": 8.5,
    "mistralai/Mixtral-8x7B-Instruct-v0.1": 12.9,
}


@dataclass(frozen=True)
class DatasetSpec:
    files: tuple[str, ...]  # relative to the data directory
    test_files: tuple[str, ...] = ()  # the set's own test split; empty: split `files` by id hash
    preds: str | None = None  # recorded answer letters, for a real vote
    models: str | None = None  # per-model sizes


DATASETS: dict[str, DatasetSpec] = {
    "mmlu_pro": DatasetSpec(("routing/mmlu_pro_outcomes.jsonl",), preds="routing/mmlu_pro_preds.jsonl",
                            models="routing/mmlu_pro_models.json"),
    "llmrouter": DatasetSpec(("routing/llmrouter_train.jsonl",), test_files=("routing/llmrouter_test.jsonl",)),
    "routellm": DatasetSpec(("routing/routellm_gsm8k.jsonl", "routing/routellm_mmlu.jsonl")),
}


@dataclass
class OutcomeSet:
    """Outcome data plus what evaluation needs besides: costs, and the recorded answers if any."""

    name: str
    data: OutcomeData
    costs: np.ndarray  # per expert, same order as data.experts
    gold: list[str] | None = None  # gold answer letter per row, where answers are recorded
    preds: np.ndarray | None = None  # (rows, experts) object array of letters, None where no answer
    formats: tuple[str, ...] = ()  # the outcome file formats it was read from

    def take(self, rows) -> OutcomeSet:
        rows = np.asarray(rows, dtype=int)
        return OutcomeSet(
            name=self.name, data=self.data.take(rows), costs=self.costs,
            gold=[self.gold[i] for i in rows] if self.gold is not None else None,
            preds=self.preds[rows] if self.preds is not None else None, formats=self.formats,
        )

    def validation_mask(self) -> np.ndarray:
        """Rows of a training set held out for tuning, by a salted id hash (the test split is apart)."""
        return np.array([in_share("validation:" + i, VALIDATION_SHARE) for i in self.data.ids], dtype=bool)

    @property
    def cost_table(self) -> dict[str, float]:
        return dict(zip(self.data.experts, self.costs.tolist()))


def _data_path(file: str) -> Path:
    path = Path(file) if Path(file).is_absolute() else data_dir() / file
    if not path.is_file():
        raise CoeError(f"no outcome file {path}", f"name a data set ({', '.join(DATASETS)}) or an existing .jsonl")
    return path


def spread_rows(rows: int, size: int | None) -> np.ndarray:
    """`size` evenly spaced row numbers out of `rows` (all of them for None): the files are
    ordered by category, so a prefix would be one subject."""
    if size is None or size >= rows:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, size).astype(int))


@lru_cache(maxsize=8)
def _read(files: tuple[str, ...], known_experts: frozenset[str] | None = None) -> tuple:
    return read_outcome_files([_data_path(f) for f in files], known_experts)


def model_costs(experts: list[str], models_file: str | None = None, overrides: dict[str, float] | None = None) -> np.ndarray:
    sizes: dict[str, float | None] = {}
    if models_file:
        sizes = {m: info.get("active_params_b") for m, info in json.loads((data_dir() / models_file).read_text()).items()}
    costs = []
    for e in experts:
        cost = (overrides or {}).get(e, sizes.get(e) or KNOWN_ACTIVE_PARAMS_B.get(e))
        costs.append(API_DEFAULT_ACTIVE_PARAMS_B if cost is None else float(cost))
    return np.array(costs)


def _build(name: str, files: tuple[str, ...], spec: DatasetSpec, costs: dict[str, float] | None,
           known_experts: frozenset[str] | None) -> OutcomeSet:
    cached, read = _read(files, known_experts)
    data = cached.take(np.arange(len(cached.texts)))  # a copy: callers may change theirs
    gold = preds = None
    if spec.preds:
        by_id = {p["id"]: p["preds"] for p in read_jsonl(_data_path(spec.preds))}
        preds = np.array([[by_id.get(i, {}).get(m) for m in data.experts] for i in data.ids], dtype=object)
        gold = [answer for f in read for answer in _answers(f)]
    return OutcomeSet(name=name, data=data, costs=model_costs(data.experts, spec.models, costs), gold=gold, preds=preds,
                      formats=tuple(sorted({f.format for f in read})))


def _answers(read: OutcomeFile) -> list[str | None]:
    return read.answers if read.answers is not None else [None] * len(read.data.texts)


def load_outcomes(name: str, costs: dict[str, float] | None = None, known_experts=None) -> OutcomeSet:
    """`mmlu_pro:train`, `llmrouter:test`, `routellm` (all rows), or `path.jsonl[:train|:test]`;
    with `known_experts` (a catalog's), an expert outside them fails naming its file and line."""
    base, _, split = name.partition(":")
    if split not in ("", "train", "test"):
        raise CoeError(f"unknown split {split!r} in {name!r}", "use NAME, NAME:train or NAME:test")
    if base in DATASETS:
        spec = DATASETS[base]
    elif base.endswith(".jsonl"):
        spec = DatasetSpec((str(Path(base).resolve()),))
    else:
        raise CoeError(f"unknown data set {base!r}", f"choose one of: {', '.join(DATASETS)}, or a path to a .jsonl file")
    known = frozenset(known_experts) if known_experts is not None else None
    if spec.test_files and split:
        return _build(name, spec.test_files if split == "test" else spec.files, spec, costs, known)
    everything = _build(name, spec.files + spec.test_files, spec, costs, known)
    if not split:
        return everything
    in_test = np.array([in_share(i, TEST_SHARE) for i in everything.data.ids])
    return everything.take(np.flatnonzero(in_test if split == "test" else ~in_test))
