"""The response cache (deploy/cache.py): exact and semantic hits, what is never cached, TTL and
LRU bounds on an injected clock, persistence, and a corrupted file that is discarded while
requests go on. The semantic test at the end uses the real routing embedder (ONNX, ~1 s)."""

import hashlib
import logging
import sqlite3

import numpy as np
import pytest

from core.config import CacheConfig
from core.types import GenerationParams, Message, Query
from deploy.cache import ResponseCache, deterministic

GREEDY = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 32, "stop": [], "seed": None}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def ask(text: str, *earlier: str) -> list[dict]:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(earlier)]
    return [*turns, {"role": "user", "content": text}]


def answer(text: str) -> dict:
    return {"answer": text, "answered_by": ["smollm2-math"]}


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A small real embedding: hashed word counts (shared words make vectors close)."""
    rows = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in zip(rows, texts):
        for word in text.lower().replace("?", "").split():
            row[int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1
    return rows


def test_exact_hits_are_per_model_parameters_and_messages():
    cache = ResponseCache(CacheConfig(enabled=True))
    assert cache.get("coe", ask("2+2?"), GREEDY) is None
    assert cache.put("coe", ask("2+2?"), GREEDY, answer("4"))
    hit = cache.get("coe", ask("2+2?"), dict(GREEDY))
    assert hit.kind == "exact" and hit.similarity == 1.0 and hit.value == answer("4")
    hit.value["answer"] = "changed by the caller"  # a hit is a copy: the entry stays as it was
    assert cache.get("coe", ask("2+2?"), GREEDY).value == answer("4")
    assert cache.get("coe-symbolic", ask("2+2?"), GREEDY) is None
    assert cache.get("coe", ask("2+2?"), {**GREEDY, "max_tokens": 8}) is None
    assert cache.get("coe", ask("2+2?"), {**GREEDY, "stop": ["\n"]}) is None
    assert cache.get("coe", ask("2+2?", "hi", "hello"), GREEDY) is None  # other earlier turns
    assert cache.get("coe", ask("2+3?"), GREEDY) is None
    stats = cache.stats()
    assert stats["exact_hits"] == 2 and stats["misses"] == 6 and stats["entries"] == 1 and stats["semantic_hits"] == 0


def test_only_deterministic_requests_are_cached():
    assert deterministic(GREEDY) and deterministic({"temperature": 0.8, "seed": 7}) and not deterministic({"temperature": 0.8})
    cache = ResponseCache(CacheConfig(enabled=True))
    sampled = {**GREEDY, "temperature": 0.7}
    assert not cache.put("coe", ask("a poem"), sampled, answer("roses"))
    assert cache.get("coe", ask("a poem"), sampled) is None
    seeded = {**sampled, "seed": 3}
    assert cache.put("coe", ask("a poem"), seeded, answer("roses"))
    assert cache.get("coe", ask("a poem"), seeded).value == answer("roses")
    assert cache.get("coe", ask("a poem"), {**sampled, "seed": 4}) is None
    assert cache.stats()["bypassed"] == 1  # lookups of requests that are not cacheable


def test_entries_expire_after_the_ttl():
    clock = Clock()
    cache = ResponseCache(CacheConfig(enabled=True, ttl_seconds=60), clock=clock)
    cache.put("coe", ask("2+2?"), GREEDY, answer("4"))
    clock.now += 59
    hit = cache.get("coe", ask("2+2?"), GREEDY)
    assert hit is not None and hit.age_seconds == 59
    clock.now += 2
    assert cache.get("coe", ask("2+2?"), GREEDY) is None
    assert cache.stats()["expirations"] == 1 and cache.stats()["entries"] == 0


def test_the_least_recently_used_entry_goes_when_full():
    cache = ResponseCache(CacheConfig(enabled=True, max_entries=3))
    for question in ("a?", "b?", "c?"):
        cache.put("coe", ask(question), GREEDY, answer(question))
    assert cache.get("coe", ask("a?"), GREEDY) is not None  # a is now the most recent
    cache.put("coe", ask("d?"), GREEDY, answer("d?"))
    assert cache.get("coe", ask("b?"), GREEDY) is None
    assert all(cache.get("coe", ask(q), GREEDY) is not None for q in ("a?", "c?", "d?"))
    assert cache.stats()["entries"] == 3 and cache.stats()["evictions"] == 1


def test_semantic_hits_over_the_threshold_only():
    cache = ResponseCache(CacheConfig(enabled=True, semantic_threshold=0.9), embed=bag_of_words)
    cache.put("coe", ask("what is the capital of France?"), GREEDY, answer("Paris"))
    cache.put("coe", ask("how do plants make food?"), GREEDY, answer("photosynthesis"))
    hit = cache.get("coe", ask("what is the capital of france"), GREEDY)
    assert hit.kind == "semantic" and hit.similarity > 0.99 and hit.value == answer("Paris")
    near = cache.get("coe", ask("so what is the capital of France?"), GREEDY)  # cosine 6/sqrt(42) = 0.93
    assert near.kind == "semantic" and 0.9 <= near.similarity < 1.0 and near.value == answer("Paris")
    assert cache.get("coe", ask("what is the capital of Spain?"), GREEDY) is None  # 5/6 = 0.83: below the threshold
    assert cache.get("coe-symbolic", ask("what is the capital of France?"), GREEDY) is None  # another model
    assert cache.get("coe", ask("what is the capital of France?", "hello", "hi"), GREEDY) is None  # other turns
    assert cache.get("coe", ask("what is the capital of France?"), GREEDY).kind == "exact"
    stats = cache.stats()
    assert stats["semantic_hits"] == 2 and stats["exact_hits"] == 1 and stats["misses"] == 3
    with pytest.raises(ValueError, match="embedding function"):
        ResponseCache(CacheConfig(semantic_threshold=0.9))


def test_semantic_entries_expire_and_leave_the_index():
    clock = Clock()
    cache = ResponseCache(CacheConfig(enabled=True, ttl_seconds=10, max_entries=1, semantic_threshold=0.8),
                          embed=bag_of_words, clock=clock)
    cache.put("coe", ask("what is the capital of France?"), GREEDY, answer("Paris"))
    clock.now += 11
    assert cache.get("coe", ask("what is the capital of france"), GREEDY) is None
    cache.put("coe", ask("what is the capital of Italy?"), GREEDY, answer("Rome"))
    cache.put("coe", ask("how do plants make food?"), GREEDY, answer("photosynthesis"))  # evicts Italy
    assert cache.get("coe", ask("what is the capital of italy"), GREEDY) is None
    assert cache.get("coe", ask("how do plants make food"), GREEDY).value == answer("photosynthesis")


def test_the_cache_survives_a_restart_on_disk(tmp_path):
    path, clock = tmp_path / "cache.sqlite", Clock()
    settings = CacheConfig(enabled=True, path=path, ttl_seconds=100, max_entries=2, semantic_threshold=0.8)
    first = ResponseCache(settings, embed=bag_of_words, clock=clock)
    first.put("coe", ask("old question?"), GREEDY, answer("old"))
    clock.now += 50
    first.put("coe", ask("what is the capital of France?"), GREEDY, answer("Paris"))
    first.put("coe", ask("how do plants make food?"), GREEDY, answer("photosynthesis"))  # evicts the old one
    first.get("coe", ask("what is the capital of France?"), GREEDY)  # Paris: most recently used
    first.close()
    second = ResponseCache(settings.model_copy(update={"max_entries": 1}), embed=bag_of_words, clock=clock)
    assert second.stats()["entries"] == 1  # the most recently used one
    assert second.get("coe", ask("what is the capital of france"), GREEDY).value == answer("Paris")  # vectors kept
    second.close()
    exact_only = ResponseCache(settings.model_copy(update={"semantic_threshold": None}), clock=clock)
    assert exact_only.get("coe", ask("what is the capital of France?"), GREEDY).kind == "exact"
    assert exact_only.get("coe", ask("what is the capital of france"), GREEDY) is None
    exact_only.close()
    clock.now += 101  # Paris is 101 s old: past its TTL
    third = ResponseCache(settings, embed=bag_of_words, clock=clock)
    assert third.stats()["entries"] == 0 and third.get("coe", ask("what is the capital of France?"), GREEDY) is None


def test_a_corrupted_file_is_discarded_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"\x00garbage, not SQLite" * 512)
    with caplog.at_level(logging.WARNING, logger="coe.cache"):
        cache = ResponseCache(CacheConfig(enabled=True, path=path))
    assert "cannot be read" in caplog.text and "discarding" in caplog.text
    assert cache.stats()["rebuilds"] == 1 and cache.stats()["entries"] == 0
    cache.put("coe", ask("2+2?"), GREEDY, answer("4"))
    assert cache.get("coe", ask("2+2?"), GREEDY).value == answer("4")
    cache.close()
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 1  # a valid file again
    assert ResponseCache(CacheConfig(enabled=True, path=path)).get("coe", ask("2+2?"), GREEDY).value == answer("4")


def test_rows_that_are_not_what_the_cache_wrote_are_discarded(tmp_path, caplog):
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(CacheConfig(enabled=True, path=path))
    cache.put("coe", ask("2+2?"), GREEDY, answer("4"))
    cache.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE entries SET value = '{not json'")
    with caplog.at_level(logging.WARNING, logger="coe.cache"):
        cache = ResponseCache(CacheConfig(enabled=True, path=path))
    assert "discarding" in caplog.text and cache.stats()["entries"] == 0


def test_a_file_corrupted_while_serving_is_rebuilt_from_memory(tmp_path, caplog):
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(CacheConfig(enabled=True, path=path))
    cache.put("coe", ask("2+2?"), GREEDY, answer("4"))
    path.write_bytes(b"\x00overwritten by something else" * 512)
    with caplog.at_level(logging.WARNING, logger="coe.cache"):
        cache.put("coe", ask("3+3?"), GREEDY, answer("6"))  # the write fails: the file is rebuilt, the answer kept
    assert "rebuilding" in caplog.text and cache.stats()["rebuilds"] == 1
    assert cache.get("coe", ask("2+2?"), GREEDY).value == answer("4")
    cache.close()
    reopened = ResponseCache(CacheConfig(enabled=True, path=path))
    assert reopened.stats()["entries"] == 2 and reopened.stats()["rebuilds"] == 0


def test_semantic_hits_with_the_routing_embedder():
    from routers.embedder import shared_embedder

    embedder = shared_embedder()
    cache = ResponseCache(CacheConfig(enabled=True, semantic_threshold=0.85), embed=embedder.embed)
    cache.put("coe", ask("What is the capital of France?"), GREEDY, answer("Paris"))
    hit = cache.get("coe", ask("What's the capital city of France?"), GREEDY)
    assert hit is not None and hit.kind == "semantic" and hit.value == answer("Paris")
    assert cache.get("coe", ask("How do I bake sourdough bread?"), GREEDY) is None


def test_pipeline_queries_and_hits_marked_for_the_response():
    cache = ResponseCache(CacheConfig(enabled=True))
    query = Query(messages=[Message(role="user", content="2+2?")], params=GenerationParams(max_tokens=8), policy="coe-knn")
    assert cache.lookup(query) is None and cache.store(query, answer("4"))
    again = Query(messages=[Message(role="user", content="2+2?")], params=GenerationParams(max_tokens=8), policy="coe-knn")
    marked = cache.lookup(again).annotated()
    assert marked["answer"] == "4" and marked["cache"] == {"hit": "exact", "similarity": 1.0, "age_seconds": marked["cache"]["age_seconds"]}
    assert cache.lookup(again.model_copy(update={"params": GenerationParams(max_tokens=9)})) is None
    assert not cache.store(again.model_copy(update={"params": GenerationParams(temperature=0.5)}), answer("5"))
