"""A benchmark run's files: run.json (what the run is) and results.jsonl (one record per finished
item). The runner writes them, the reports read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, Field

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"


class RunConfig(BaseModel):
    """What a run is. A resumed run must ask the same (the fields in IDENTITY)."""

    benchmark: str
    policy: str
    via: str | None = None  # base URL of a running `coe serve`, e.g. http://127.0.0.1:8000/v1
    replay: str | None = None  # an outcome data set (evals.outcomes): replay experts answer from its recorded trace
    config: str | None = None  # coe YAML config for an in-process run
    limit: int | None = Field(None, ge=1)  # a sample of this many items, spread over the set
    batch_size: int = Field(16, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # None: the benchmark's
    judge: str | None = None  # policy or expert that rates MT-Bench answers; None: answers are only saved
    judge_max_tokens: int = Field(256, ge=1)  # room for the judge's reasoning before its "[[rating]]"
    include_fitted: bool = False
    backend: str | None = None  # what answered (hf, replay, http); filled in by the run

    IDENTITY: ClassVar[tuple[str, ...]] = ("benchmark", "policy", "via", "replay", "config", "max_tokens", "judge", "judge_max_tokens",
                                      "include_fitted")

    def identity(self) -> dict:
        return {key: getattr(self, key) for key in self.IDENTITY}


class ResultStore:
    """results.jsonl: one record per finished item, in finishing order."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict]:
        """The finished records by item id. A line cut short by a kill is dropped and cut off the
        file, so the next append starts on a fresh line."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
        records: dict[str, dict] = {}
        for line in complete.decode().splitlines():
            if line.strip():
                record = json.loads(line)
                records.setdefault(record["id"], record)
        return records

    def append(self, records: list[dict]) -> None:
        # One write per batch, flushed: a killed process loses at most the batch in flight (the
        # kernel keeps what was written; fsync would only guard against a power cut).
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
