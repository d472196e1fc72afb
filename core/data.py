"""Loaders for the shared benchmark and routing data (../shared/data beside the repo).

The data is never copied into the repo: set COE_DATA_DIR to point elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from core.errors import CoeError
from core.paths import data_dir


class Item(BaseModel):
    id: str
    benchmark: str
    category: str
    question: str
    choices: list[str] | None = None
    answer: str
    answer_type: str
    split: str | None = None
    solution: str | None = None
    turns: list[str] | None = None  # MT-Bench: the user turns of a conversation
    reference: list[str] | None = None  # MT-Bench: reference answers per turn, where given


def in_share(item_id: str, share: float) -> bool:
    """A stable pseudo-random split by id: the same id falls on the same side on every machine."""
    digest = hashlib.sha256(item_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=32)
def load_benchmark(file: str) -> tuple[Item, ...]:
    """Items of one benchmark file, e.g. `gsm8k_test` (cached: files are read-only)."""
    path = data_dir() / "benchmarks" / f"{file}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in (data_dir() / "benchmarks").glob("*.jsonl"))
        raise CoeError(f"no benchmark file {file!r}", f"choose one of: {', '.join(known)}")
    return tuple(Item.model_validate(row) for row in read_jsonl(path))
