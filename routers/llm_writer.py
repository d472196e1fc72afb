"""A catalog expert that writes a short text about each query (skills, a task instruction), cached.

Symbolic-MoE asks an LLM for the skills a question needs; GLIDER asks one for the task
instruction behind a query. The LLM is handed in (`generate`: prompts and a token budget in,
texts out; experts/helpers.py builds one on a backend), so routers never start a model
themselves. On a CPU that is about 1-3 s per query even batched, so every answer is cached on disk
(JSON keyed by a hash of prompt and query) and runs bound the number of queries they send.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from core.errors import CoeError
from core.paths import cache_dir

TextGenerator = Callable[[list[str], int], list[str]]  # prompts, max new tokens -> texts

MAX_QUESTION_CHARS = 500  # the stem names the task; long option lists only cost time


def question_stem(text: str) -> str:
    """The question without its lettered options, shortened."""
    return text.split("\n\nA. ", 1)[0][:MAX_QUESTION_CHARS]


class CachedLLMWriter:
    def __init__(self, task: str, prompt: str, max_tokens: int = 24, expert: str | None = None, batch_size: int = 16,
                 generate: TextGenerator | None = None):
        self.task = task
        self.prompt = prompt  # with a {question} field
        self.max_tokens = max_tokens
        self.expert = expert  # names the writer in the cache key (the generator's expert)
        self.batch_size = batch_size
        self.generate = generate
        self._cache: dict[str, str] | None = None

    @property
    def cache_path(self) -> Path:
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
        if self.generate is None:
            raise CoeError(f"the LLM {self.task} writer has no LLM and {len(texts)} queries are not in its cache",
                           "hand the router an `llm` (experts.helpers.BackendLLM) or use the embedding extractor")
        return self.generate([self.prompt.format(question=question_stem(t)) for t in texts], self.max_tokens)
