"""A catalog expert that writes a short text about each query (skills, a task instruction), cached.

Symbolic-MoE asks an LLM for the skills a question needs; GLIDER asks one for the task
instruction behind a query. Both run the general expert of the catalog (SmolLM2 in the embedded
pool) through the HF backend. On a CPU that is about 1-3 s per query even batched, so every
answer is cached on disk (JSON keyed by a hash of prompt and query) and runs bound the number of
queries they send. torch is imported only when something has to be generated.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MAX_QUESTION_CHARS = 500  # the stem names the task; long option lists only cost time


def question_stem(text: str) -> str:
    """The question without its lettered options, shortened."""
    return text.split("\n\nA. ", 1)[0][:MAX_QUESTION_CHARS]


class CachedLLMWriter:
    def __init__(self, task: str, prompt: str, max_tokens: int = 24, expert: str | None = None, batch_size: int = 16):
        self.task = task
        self.prompt = prompt  # with a {question} field
        self.max_tokens = max_tokens
        self.expert = expert
        self.batch_size = batch_size
        self._backend = None
        self._cache: dict[str, str] | None = None

    @property
    def cache_path(self) -> Path:
        from experts.weights import cache_dir

        tag = hashlib.sha256(f"{self.prompt}\x00{self.expert}\x00{self.max_tokens}".encode()).hexdigest()[:10]
        return cache_dir() / "llm_writer" / f"{self.task}-{tag}.json"

    def _key(self, text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _load_cache(self) -> dict[str, str]:
        if self._cache is None:
            path = self.cache_path
            self._cache = json.loads(path.read_text()) if path.is_file() else {}
        return self._cache

    def _save_cache(self) -> None:
        path = self.cache_path
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".tmp{os.getpid()}")
        staging.write_text(json.dumps(self._cache))
        os.replace(staging, path)

    def cached(self, texts: list[str]) -> list[str | None]:
        cache = self._load_cache()
        return [cache.get(self._key(t)) for t in texts]

    def write(self, texts: list[str], progress: bool = False) -> list[str]:
        cache = self._load_cache()
        todo = list(dict.fromkeys(t for t in texts if self._key(t) not in cache))
        if todo:
            from tqdm import tqdm

            for start in tqdm(range(0, len(todo), self.batch_size), desc=f"LLM {self.task}", unit="batch", disable=not progress):
                batch = todo[start : start + self.batch_size]
                for text, answer in zip(batch, self._generate(batch)):
                    cache[self._key(text)] = answer
                self._save_cache()
        return [cache[self._key(t)] for t in texts]

    def _generate(self, texts: list[str]) -> list[str]:
        from experts.backends.base import GenerationRequest
        from orchestrator.types import GenerationParams, Message

        backend, expert = self._load_backend()
        params = GenerationParams(max_tokens=self.max_tokens, stop=["\n"])
        requests = [
            GenerationRequest(expert=expert, params=params,
                              messages=[Message(role="user", content=self.prompt.format(question=question_stem(t)))])
            for t in texts
        ]
        return [answer.text for answer in backend.generate(requests)]

    def _load_backend(self):
        if self._backend is None:
            from experts.backends.hf import HFBackend
            from experts.catalog import load_catalog

            catalog = load_catalog()
            self._backend = (HFBackend(catalog, dtype="bfloat16"), self.expert or catalog.default_expert)
        return self._backend
