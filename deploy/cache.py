"""The response cache of the ingress: exact matches and, opt-in, semantic ones.

Only deterministic requests are cached (temperature 0 or a seed): anything else would hand one
sample to every caller. An entry is keyed by the model (policy or expert) and every sampling
parameter, so a request with another max_tokens or stop never gets another's answer. Exact: the
same messages. Semantic (`semantic_threshold`): the same model, parameters and earlier turns, and
a last message whose embedding has cosine >= the threshold with a cached one's (faiss inner
product over unit vectors; the embedding function is handed in, e.g. the routing embedder's).

Entries expire after `ttl_seconds`; past `max_entries` the least recently used goes. With a
`path` the entries are also kept in SQLite for the next start; a file that cannot be read is
discarded and rebuilt with a warning, and a disk that keeps failing leaves the cache in memory:
a request is answered whatever the cache's file does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel

from core.config import CacheConfig
from core.types import Query

logger = logging.getLogger("coe.cache")
SEMANTIC_CANDIDATES = 8  # nearest entries looked at, in case the nearest has expired

Embed = Callable[[list[str]], np.ndarray]


class CacheHit(BaseModel):
    value: dict
    kind: Literal["exact", "semantic"]
    similarity: float  # 1.0 for an exact hit
    age_seconds: float

    def annotated(self) -> dict:
        """The cached value marked as a hit (the `cache` field of a response's `coe` metadata)."""
        return {**self.value, "cache": {"hit": self.kind, "similarity": round(self.similarity, 4),
                                        "age_seconds": round(self.age_seconds, 3)}}


def deterministic(params: dict) -> bool:
    """A request whose answer is worth reusing: greedy, or sampled with a fixed seed."""
    return params.get("temperature", 1.0) == 0 or params.get("seed") is not None


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class _Entry:
    key: str
    semantic_scope: str  # model, parameters and every turn but the last
    created: float
    value: dict
    vector: np.ndarray | None = None
    vector_id: int | None = None


class _SemanticIndex:
    """One faiss inner-product index per semantic scope, ids mapping back to entries."""

    def __init__(self):
        import faiss

        self._faiss = faiss
        self.indexes: dict[str, object] = {}
        self.entries: dict[int, str] = {}  # vector id -> entry key
        self._next = 0

    def add(self, scope: str, vector: np.ndarray, key: str) -> int | None:
        """The vector's id; None when the scope holds vectors of another size (another embedder
        wrote the file): the entry then matches exactly only."""
        index = self.indexes.get(scope)
        if index is None:
            index = self.indexes[scope] = self._faiss.IndexIDMap2(self._faiss.IndexFlatIP(vector.shape[0]))
        if index.d != vector.shape[0]:
            return None
        vector_id, self._next = self._next, self._next + 1
        index.add_with_ids(vector[None, :], np.array([vector_id], dtype=np.int64))
        self.entries[vector_id] = key
        return vector_id

    def remove(self, scope: str, vector_id: int) -> None:
        index = self.indexes.get(scope)
        if index is not None:
            index.remove_ids(np.array([vector_id], dtype=np.int64))
            if index.ntotal == 0:
                del self.indexes[scope]
        self.entries.pop(vector_id, None)

    def nearest(self, scope: str, vector: np.ndarray) -> list[tuple[float, str]]:
        index = self.indexes.get(scope)
        if index is None or index.d != vector.shape[0]:
            return []
        scores, ids = index.search(vector[None, :], min(SEMANTIC_CANDIDATES, index.ntotal))
        return [(float(s), self.entries[int(i)]) for s, i in zip(scores[0], ids[0]) if i >= 0]


class _DiskStore:
    """The entries in SQLite, written through; `CorruptCache` when the file cannot be trusted."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), check_same_thread=False)
        check = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        with self.conn:
            self.conn.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, semantic_scope TEXT, "
                              "created REAL, used REAL, value TEXT, vector BLOB)")

    def load(self) -> tuple[list[_Entry], int]:
        """The entries, least recently used first, and the last use's sequence number."""
        rows = self.conn.execute("SELECT key, semantic_scope, created, value, vector, used FROM entries ORDER BY used").fetchall()
        entries = []
        for key, scope, created, value, vector, _ in rows:
            parsed = json.loads(value)
            if not isinstance(parsed, dict):
                raise sqlite3.DatabaseError(f"entry {key[:12]} is not a JSON object")
            entries.append(_Entry(key, scope, created, parsed,
                                  np.frombuffer(vector, dtype=np.float32).copy() if vector is not None else None))
        return entries, int(rows[-1][5]) if rows else 0

    def put(self, entry: _Entry, used: float) -> None:
        blob = entry.vector.astype(np.float32).tobytes() if entry.vector is not None else None
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                              (entry.key, entry.semantic_scope, entry.created, used, json.dumps(entry.value), blob))

    def touch(self, key: str, used: float) -> None:
        with self.conn:
            self.conn.execute("UPDATE entries SET used = ? WHERE key = ?", (used, key))

    def delete(self, keys: list[str]) -> None:
        with self.conn:
            self.conn.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])

    def clear(self) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM entries")

    def close(self) -> None:
        self.conn.close()

    @staticmethod
    def discard(path: Path) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


# ValueError, TypeError: a row that is not the JSON (or a vector not the bytes) it should be
DISK_ERRORS = (sqlite3.Error, OSError, ValueError, TypeError)


class ResponseCache:
    """Answers of deterministic requests by model, sampling parameters and messages. Thread-safe;
    `get` embeds (semantic mode) before taking the lock, so call it from a worker thread in an
    event loop."""

    def __init__(self, settings: CacheConfig, embed: Embed | None = None, clock: Callable[[], float] = time.time):
        if settings.semantic_threshold is not None and embed is None:
            raise ValueError("a semantic cache needs an embedding function")
        self.settings = settings
        self.embed = embed if settings.semantic_threshold is not None else None
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._semantic = _SemanticIndex() if self.embed is not None else None
        self._counts = {"exact_hits": 0, "semantic_hits": 0, "misses": 0, "bypassed": 0, "evictions": 0,
                        "expirations": 0, "rebuilds": 0}
        self._disk: _DiskStore | None = None
        self._uses = 0  # sequence of puts and hits: the order of use on disk (a clock may tie)
        if settings.path is not None:
            self._open_disk(settings.path)

    # -- keys ------------------------------------------------------------------------------------

    @staticmethod
    def _scopes(model: str, messages: list[dict], params: dict) -> tuple[str, str]:
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        return _digest(model, params, turns), _digest(model, params, turns[:-1])

    def _vector(self, messages: list[dict]) -> np.ndarray:
        vector = np.asarray(self.embed([messages[-1]["content"]]), dtype=np.float32)[0]
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    # -- lookups ---------------------------------------------------------------------------------

    def get(self, model: str, messages: list[dict], params: dict) -> CacheHit | None:
        """The cached answer for this request, exact first, then the nearest similar one."""
        if not deterministic(params):
            with self._lock:
                self._counts["bypassed"] += 1
            return None
        key, scope = self._scopes(model, messages, params)
        with self._lock:
            now = self.clock()
            entry = self._live(key, now)
            if entry is not None:
                return self._hit(entry, "exact", 1.0, now)
            if self._semantic is None or not self._semantic.indexes.get(scope):
                self._counts["misses"] += 1
                return None
        vector = self._vector(messages)  # outside the lock: milliseconds of CPU
        with self._lock:
            now = self.clock()
            for similarity, candidate in self._semantic.nearest(scope, vector):
                if similarity < self.settings.semantic_threshold:
                    break
                entry = self._live(candidate, now)
                if entry is not None:
                    return self._hit(entry, "semantic", similarity, now)
            self._counts["misses"] += 1
            return None

    def put(self, model: str, messages: list[dict], params: dict, value: dict) -> bool:
        """Keep an answer (a JSON object); False when the request is not deterministic."""
        if not deterministic(params):
            return False
        key, scope = self._scopes(model, messages, params)
        vector = self._vector(messages) if self._semantic is not None else None
        with self._lock:
            self._drop([key])
            entry = _Entry(key, scope, self.clock(), json.loads(json.dumps(value)), vector)
            self._insert(entry)
            self._write(lambda disk: disk.put(entry, self._next_use()))
            overflow = list(self._entries)[: max(0, len(self._entries) - self.settings.max_entries)]
            self._counts["evictions"] += len(overflow)
            self._drop(overflow)
        return True

    def lookup(self, query: Query) -> CacheHit | None:
        """`get` for a pipeline Query (its policy, messages and sampling parameters)."""
        return self.get(*self._request(query))

    def store(self, query: Query, value: dict) -> bool:
        """`put` for a pipeline Query."""
        return self.put(*self._request(query), value)

    @staticmethod
    def _request(query: Query) -> tuple[str, list[dict], dict]:
        return query.policy or "coe", [m.model_dump() for m in query.messages], query.params.model_dump()

    def stats(self) -> dict:
        """For /metrics: hits by kind, misses, requests not cacheable, entries and removals."""
        with self._lock:
            return {**self._counts, "entries": len(self._entries), "max_entries": self.settings.max_entries,
                    "persisted": self._disk is not None}

    def clear(self) -> None:
        with self._lock:
            self._drop(list(self._entries))
            self._write(lambda disk: disk.clear())

    def close(self) -> None:
        with self._lock:
            if self._disk is not None:
                self._disk.close()
                self._disk = None

    # -- internals (under the lock) --------------------------------------------------------------

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and now - entry.created > self.settings.ttl_seconds:
            self._counts["expirations"] += 1
            self._drop([key])
            return None
        return entry

    def _hit(self, entry: _Entry, kind: Literal["exact", "semantic"], similarity: float, now: float) -> CacheHit:
        self._counts[f"{kind}_hits"] += 1
        self._entries.move_to_end(entry.key)
        use = self._next_use()
        self._write(lambda disk: disk.touch(entry.key, use))
        return CacheHit(value=json.loads(json.dumps(entry.value)), kind=kind, similarity=similarity,
                        age_seconds=now - entry.created)

    def _next_use(self) -> int:
        self._uses += 1
        return self._uses

    def _insert(self, entry: _Entry) -> None:
        self._entries[entry.key] = entry
        if self._semantic is not None and entry.vector is not None:
            entry.vector_id = self._semantic.add(entry.semantic_scope, entry.vector, entry.key)

    def _drop(self, keys: list[str]) -> None:
        gone = [self._entries.pop(k) for k in keys if k in self._entries]
        for entry in gone:
            if self._semantic is not None and entry.vector_id is not None:
                self._semantic.remove(entry.semantic_scope, entry.vector_id)
        if gone:
            self._write(lambda disk: disk.delete([e.key for e in gone]))

    # -- the file --------------------------------------------------------------------------------

    def _open_disk(self, path: Path) -> None:
        try:
            self._disk = _DiskStore(path)
            entries, self._uses = self._disk.load()
        except DISK_ERRORS as exc:
            logger.warning("response cache %s cannot be read (%s); discarding it and starting empty", path, exc)
            self._counts["rebuilds"] += 1
            self._reset_disk(path)
            return
        now = self.clock()
        fresh = [e for e in entries if now - e.created <= self.settings.ttl_seconds]
        for entry in fresh[-self.settings.max_entries:]:  # the most recently used, in their order
            if self._semantic is None:
                entry.vector = None  # written by a semantic cache: exact matches still hold
            self._insert(entry)
        stale = [e.key for e in entries if e.key not in self._entries]
        self._write(lambda disk: disk.delete(stale))

    def _reset_disk(self, path: Path) -> None:
        """A fresh file holding what memory holds; memory only if even that fails."""
        if self._disk is not None:
            try:
                self._disk.close()
            except sqlite3.Error:
                pass
        self._disk = None
        try:
            _DiskStore.discard(path)
            disk = _DiskStore(path)
            for entry in self._entries.values():
                disk.put(entry, self._next_use())
            self._disk = disk
        except DISK_ERRORS as exc:
            logger.warning("response cache %s cannot be written (%s); keeping the cache in memory only", path, exc)

    def _write(self, operation: Callable[[_DiskStore], None]) -> None:
        if self._disk is None:
            return
        try:
            operation(self._disk)
        except DISK_ERRORS as exc:
            logger.warning("response cache %s failed (%s); rebuilding it from memory", self._disk.path, exc)
            self._counts["rebuilds"] += 1
            self._reset_disk(self._disk.path)
