"""Outcome files: the routing data a user brings (`coe router fit --data FILE.jsonl`), read into
OutcomeData. Serving code reads them too, so they live here, not in evals/.

JSON Lines, one object a line, in one of three formats, told apart per file by its first row:

- `outcomes` (one row per query, every expert's score on it; the recorded data sets in
  ../shared/data/routing are in it): `{"id", "question", "outcomes": {expert: score}, "category"?}`
  with `choices` (a list, joined into the routing text as a user would send it), `answer`, and the
  benchmark fields `benchmark`, `answer_type`, `split`, `src` allowed and otherwise ignored. An
  expert of the file missing from a row, or null there, did not answer that query: its outcome is
  0 (a call that gives no answer is a failed call). Ids are unique.
- `scores` (one row per measurement): `{"query", "expert", "score", "id"?, "category"?}`. Rows
  of one query (the same `id`, else the same `query` text) form one routing row; several scores
  of one expert on it are averaged; an expert with no score on a query is unmeasured there (NaN),
  not failed.
- `pairwise` (RouteLLM's preference data): `{"query", "winner", "loser", "tie"?, "id"?,
  "category"?}`. Each comparison gives the winner 1 and the loser 0 (a tie: 0.5 each); an expert's
  score on a query is its mean over the comparisons it took part in on that query (its win rate
  there), and an expert never compared on a query is unmeasured there (NaN).

Scores lie in [0, 1]. Any malformed line (not JSON, an unknown or missing field, a score out of
range, a row of another format than the file's) or, where the catalog's experts are given, an
expert the catalog lacks, fails with one message naming the file and the line.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import CoeError
from core.prompts import format_question
from routers.base import OutcomeData

Score = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Text = Annotated[str, Field(min_length=1)]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutcomesRow(_Row):
    id: str | int
    question: Text
    outcomes: dict[str, Score | None]
    category: str | None = None
    choices: list[str] | None = None
    answer: str | None = None
    benchmark: str | None = None
    answer_type: str | None = None
    split: str | None = None
    src: str | None = None

    @property
    def experts(self) -> list[str]:
        return list(self.outcomes)


class ScoreRow(_Row):
    query: Text
    expert: Text
    score: Score
    id: str | int | None = None
    category: str | None = None

    @property
    def experts(self) -> list[str]:
        return [self.expert]


class PairwiseRow(_Row):
    query: Text
    winner: Text
    loser: Text
    tie: bool = False
    id: str | int | None = None
    category: str | None = None

    @property
    def experts(self) -> list[str]:
        return [self.winner, self.loser]


FORMATS: dict[str, type[_Row]] = {"outcomes": OutcomesRow, "scores": ScoreRow, "pairwise": PairwiseRow}
FORMAT_HELP = ('outcomes: {"id", "question", "outcomes": {expert: score}, "category"?}; '
               'scores: {"query", "expert", "score", "id"?, "category"?}; '
               'pairwise: {"query", "winner", "loser", "tie"?, "id"?, "category"?}')


@dataclass
class OutcomeFile:
    """One file's rows as fitting data, and what it said besides."""

    path: Path
    format: str
    data: OutcomeData
    answers: list[str | None] | None = None  # `outcomes` format: each row's gold answer, where given


def detect_format(row: dict) -> str | None:
    if "outcomes" in row:
        return "outcomes"
    if "winner" in row or "loser" in row:
        return "pairwise"
    if "expert" in row or "score" in row:
        return "scores"
    return None


def _explain(error: ValidationError, format_name: str) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    fields = ", ".join(FORMATS[format_name].model_fields)
    if first["type"] == "extra_forbidden":
        return f"unknown field {field!r} (a row of the {format_name} format has: {fields})"
    if first["type"] == "missing":
        return f"missing field {field!r} (a row of the {format_name} format has: {fields})"
    return f"{field}: {first['msg']}"


def parse_rows(path: Path, known_experts: Collection[str] | None = None) -> tuple[str, list[tuple[int, _Row]]]:
    """The file's format and its validated rows with their line numbers."""
    if not path.is_file():
        raise CoeError(f"outcome file {path} does not exist", "pass an existing .jsonl file")
    format_name = first_line = None
    rows: list[tuple[int, _Row]] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except ValueError as exc:
                raise CoeError(f"{where}: not valid JSON ({exc})", "one JSON object per line") from None
            if not isinstance(raw, dict):
                raise CoeError(f"{where}: not a JSON object", "one JSON object per line")
            if format_name is None:
                format_name, first_line = detect_format(raw), number
                if format_name is None:
                    raise CoeError(f"{where}: cannot tell the outcome format from the fields {sorted(raw)}",
                                   f"use one of the formats: {FORMAT_HELP}")
            if detect_format(raw) not in (None, format_name):
                raise CoeError(f"{where}: a row of the {detect_format(raw)} format in a file of the {format_name} format "
                               f"(line {first_line})", "one format per file")
            try:
                row = FORMATS[format_name].model_validate(raw)
            except ValidationError as exc:
                detected = f"the file is in the {format_name} format (line {first_line})"
                raise CoeError(f"{where}: {_explain(exc, format_name)}; {detected}", f"formats: {FORMAT_HELP}") from None
            if isinstance(row, PairwiseRow) and row.winner == row.loser:
                raise CoeError(f"{where}: winner and loser are both {row.winner!r}", "a comparison names two experts")
            if known_experts is not None:
                unknown = [e for e in row.experts if e not in known_experts]
                if unknown:
                    raise CoeError(f"{where}: expert {unknown[0]!r} is not in the catalog",
                                   f"catalog experts: {', '.join(sorted(known_experts))}")
            rows.append((number, row))
    if not rows:
        raise CoeError(f"outcome file {path} has no rows", f"one JSON object per line; formats: {FORMAT_HELP}")
    return format_name, rows


def read_outcome_file(path: str | Path, known_experts: Collection[str] | None = None) -> OutcomeFile:
    """Read, validate and aggregate one outcome file (see the module docstring for the formats)."""
    path = Path(path)
    format_name, rows = parse_rows(path, known_experts)
    if format_name == "outcomes":
        return _from_outcome_rows(path, rows)
    return OutcomeFile(path=path, format=format_name, data=_from_measurements(path, rows))


def _from_outcome_rows(path: Path, rows: list[tuple[int, OutcomesRow]]) -> OutcomeFile:
    seen: dict[str, int] = {}
    for number, row in rows:
        key = str(row.id)
        if key in seen:
            raise CoeError(f"{path}:{number}: id {key!r} repeats line {seen[key]}", "give every query its own id")
        seen[key] = number
    experts = sorted({e for _, r in rows for e in r.outcomes})
    outcomes = np.array([[r.outcomes.get(e) or 0.0 for e in experts] for _, r in rows], dtype=np.float64)
    data = OutcomeData(texts=[format_question(r.question, r.choices) for _, r in rows], experts=experts, outcomes=outcomes,
                       categories=[r.category or "unknown" for _, r in rows], ids=[str(r.id) for _, r in rows])
    return OutcomeFile(path=path, format="outcomes", data=data, answers=[r.answer for _, r in rows])


def _from_measurements(path: Path, rows: list[tuple[int, ScoreRow | PairwiseRow]]) -> OutcomeData:
    """Rows of the scores or pairwise format, one routing row per query, mean score per expert."""
    queries: dict[str, tuple[int, str, str | None]] = {}  # key -> (first line, text, category)
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])  # (key, expert) -> [sum, count]
    for number, row in rows:
        key = str(row.id) if row.id is not None else row.query
        if key in queries and queries[key][1] != row.query:
            raise CoeError(f"{path}:{number}: id {key!r} has another query than on line {queries[key][0]}",
                           "one id per query text")
        first = queries.setdefault(key, (number, row.query, row.category))
        if row.category is not None and first[2] is None:
            queries[key] = (first[0], first[1], row.category)
        if isinstance(row, ScoreRow):
            credits = [(row.expert, row.score)]
        else:
            credits = [(row.winner, 0.5 if row.tie else 1.0), (row.loser, 0.5 if row.tie else 0.0)]
        for expert, score in credits:
            totals[(key, expert)][0] += score
            totals[(key, expert)][1] += 1
    experts = sorted({expert for _, expert in totals})
    keys = list(queries)
    outcomes = np.full((len(keys), len(experts)), np.nan)
    row_of, column_of = {k: i for i, k in enumerate(keys)}, {e: j for j, e in enumerate(experts)}
    for (key, expert), (total, count) in totals.items():
        outcomes[row_of[key], column_of[expert]] = total / count
    ids = [key if key != queries[key][1] else "q-" + hashlib.sha256(key.encode()).hexdigest()[:16] for key in keys]
    return OutcomeData(texts=[queries[k][1] for k in keys], experts=experts, outcomes=outcomes,
                       categories=[queries[k][2] or "unknown" for k in keys], ids=ids)


def read_outcome_files(paths: list[str | Path], known_experts: Collection[str] | None = None) -> tuple[OutcomeData, list[OutcomeFile]]:
    """Several outcome files as one data set (each file in its own format). An expert a file
    never names is failed there if the file is in the outcomes format (it did not answer), and
    unmeasured (NaN) otherwise."""
    files = [read_outcome_file(p, known_experts) for p in paths]
    if len(files) == 1:
        return files[0].data, files
    experts = sorted({e for f in files for e in f.data.experts})
    blocks = []
    for f in files:
        block = np.full((len(f.data.texts), len(experts)), 0.0 if f.format == "outcomes" else np.nan)
        block[:, [experts.index(e) for e in f.data.experts]] = f.data.outcomes
        blocks.append(block)
    data = OutcomeData(texts=[t for f in files for t in f.data.texts], experts=experts, outcomes=np.vstack(blocks),
                       categories=[c for f in files for c in f.data.categories], ids=[i for f in files for i in f.data.ids])
    return data, files
