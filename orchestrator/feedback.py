"""The feedback store: every answered response by id, and the score a client later gives it
(`POST /v1/feedback {id, score}`), kept to refit routers (`coe router fit --from-feedback`).

SQLite in the coe state dir (`feedback.sqlite3` under COE_STATE_DIR, or `feedback.path`), in WAL
mode: readers never block the writer, and several processes (Serve replicas, a refit) share the
file; each write is one short transaction, and a writer that finds the file locked waits for it
(busy timeout) instead of failing. Commits are durable across process restarts (`synchronous =
NORMAL`: a power cut may lose the last commits, never corrupt the file).

Per response: the query text (or, with `log_prompts: false`, only its embedding and the
embedder's name), the policy, the experts that answered, when, and later the score in [0, 1]
(the last one sent wins). Rows older than `retention_days` are deleted, checked at most once an
hour by the writer. Refitting only reads: a refit that fails leaves every row as it was.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from core.config import FeedbackConfig
from core.errors import CoeError, UnknownNameError
from core.paths import state_dir
from routers.base import EmbedFn, OutcomeData, default_embed, embedder_name

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
PURGE_EVERY_S = 3600.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,          -- unix seconds
    policy TEXT NOT NULL,
    experts TEXT NOT NULL,             -- JSON list: the experts whose answers made the response
    query TEXT,                        -- NULL with log_prompts: false
    embedding BLOB,                    -- float32 query vector, kept where the text is not
    embedder TEXT,                     -- the embedder that made it
    score REAL,                        -- NULL until feedback arrives
    scored_at REAL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at);
"""


class UnknownResponseError(UnknownNameError):
    """Feedback for a response id the store does not hold (never answered here, or expired)."""


@dataclass
class FeedbackOutcomes:
    """Scored responses as fitting data: one row per response, its answering experts credited
    with its score (the other experts unmeasured: NaN), each row's category the experts that
    answered it. `embeddings` (one row per text) where some responses kept only their
    embedding; their text is then empty."""

    data: OutcomeData
    embeddings: np.ndarray | None
    embedder: str | None
    skipped: int  # embedding-only responses from another embedder than the current one


def default_store_path() -> Path:
    return state_dir() / "feedback.sqlite3"


class FeedbackStore:
    """One store per process and file; thread-safe (a connection per thread) and fork-safe."""

    def __init__(self, path: str | Path | None = None, retention_days: float = 90.0, log_prompts: bool = True,
                 embed: EmbedFn | None = None):
        self.path = Path(path) if path is not None else default_store_path()
        self.retention_days = retention_days
        self.log_prompts = log_prompts
        self.embed = embed or default_embed
        self._local = threading.local()
        self._last_purge = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection().executescript(SCHEMA)  # idempotent; executescript runs outside our transactions
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CoeError(f"feedback store {self.path} has schema version {version}, newer than this coe reads "
                               f"({SCHEMA_VERSION})", "upgrade coe, or point feedback.path at another file")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.purge()

    @classmethod
    def from_config(cls, config: FeedbackConfig, embed: EmbedFn | None = None) -> FeedbackStore:
        return cls(config.path, retention_days=config.retention_days, log_prompts=config.log_prompts, embed=embed)

    # -- connections ------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # a forked child opens its own
            try:
                local.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                local.db.execute("PRAGMA journal_mode = WAL")
                local.db.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as exc:
                raise CoeError(f"cannot open the feedback store {self.path}: {exc}",
                               "check the folder is writable, or set feedback.path / COE_STATE_DIR") from None
            local.pid = os.getpid()
        return local.db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock upgrading a read lock later
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None and getattr(self._local, "pid", None) == os.getpid():
            db.close()
        self._local = threading.local()

    # -- writing ----------------------------------------------------------------------------

    def record(self, response_id: str, query: str, policy: str, experts: list[str],
               embedding: np.ndarray | None = None, embedder: str | None = None) -> None:
        """Keep an answered response so that feedback can find it by id. With `log_prompts`
        off only the query's embedding is kept: pass the router's (and its `embedder` name) to
        spare embedding it again."""
        text, vector, embedder_name = query, None, None
        if not self.log_prompts:
            text = None
            if embedding is None:
                embedding, embedder = self.embed([query])[0], self._embedder_name()
            vector = np.asarray(embedding, dtype=np.float32).tobytes()
            embedder_name = embedder or self._embedder_name()
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT INTO responses (id, created_at, policy, experts, query, embedding, embedder) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                       (response_id, now, policy, json.dumps(list(experts)), text, vector, embedder_name))
        if now - self._last_purge > PURGE_EVERY_S:
            self.purge(now)

    def score(self, response_id: str, score: float) -> dict:
        """Credit a response's experts with `score` in [0, 1] (1: right or liked, 0: wrong); the
        last score sent for a response wins. Returns the response (id, policy, experts, score)."""
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or not 0 <= score <= 1:
            raise CoeError(f"feedback score {score!r} is not a number in [0, 1]", "send 1 for a good answer, 0 for a bad one")
        with self._transaction() as db:
            updated = db.execute("UPDATE responses SET score = ?, scored_at = ? WHERE id = ?",
                                 (float(score), time.time(), response_id)).rowcount
            row = db.execute("SELECT policy, experts FROM responses WHERE id = ?", (response_id,)).fetchone()
        if not updated:
            raise UnknownResponseError(f"no response with id {response_id!r} to score",
                                       f"send the `id` of a response of the last {self.retention_days:g} days")
        return {"id": response_id, "policy": row[0], "experts": json.loads(row[1]), "score": float(score)}

    def purge(self, now: float | None = None) -> int:
        """Delete responses older than the retention period; returns how many."""
        now = time.time() if now is None else now
        self._last_purge = now
        with self._transaction() as db:
            return db.execute("DELETE FROM responses WHERE created_at < ?", (now - self.retention_days * 86400,)).rowcount

    # -- reading ----------------------------------------------------------------------------

    def get(self, response_id: str) -> dict | None:
        row = self._connection().execute(
            "SELECT id, created_at, policy, experts, query, embedder, score FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        if row is None:
            return None
        return {"id": row[0], "created_at": row[1], "policy": row[2], "experts": json.loads(row[3]), "query": row[4],
                "embedder": row[5], "score": row[6]}

    def counts(self) -> dict[str, int]:
        total, scored = self._connection().execute("SELECT COUNT(*), COUNT(score) FROM responses").fetchone()
        return {"responses": total, "scored": scored}

    def outcomes(self, since: datetime | None = None) -> FeedbackOutcomes:
        """The scored responses (answered at or after `since`) as fitting data."""
        cutoff = since.timestamp() if since is not None else 0.0
        rows = self._connection().execute(
            "SELECT id, experts, query, embedding, embedder, score FROM responses "
            "WHERE score IS NOT NULL AND created_at >= ? ORDER BY created_at, id", (cutoff,)
        ).fetchall()
        current = self._embedder_name()
        kept = [r for r in rows if r[2] is not None or r[4] == current]
        if not kept:
            when = f" since {since.isoformat()}" if since is not None else ""
            raise CoeError(f"the feedback store {self.path} has no scored responses{when}"
                           + (f" ({len(rows)} kept only embeddings of another embedder)" if rows else ""),
                           "send scores with POST /v1/feedback {id, score}, or choose an earlier --since")
        answered = [json.loads(r[1]) for r in kept]
        experts = sorted({e for names in answered for e in names})
        column = {e: j for j, e in enumerate(experts)}
        outcomes = np.full((len(kept), len(experts)), np.nan)
        for i, (row, names) in enumerate(zip(kept, answered)):
            outcomes[i, [column[e] for e in names]] = row[5]
        data = OutcomeData(texts=[r[2] or "" for r in kept], experts=experts, outcomes=outcomes,
                           categories=["+".join(names) for names in answered], ids=[r[0] for r in kept])
        embeddings = None
        vectors = [np.frombuffer(r[3], dtype=np.float32) if r[2] is None else None for r in kept]
        with_text = [i for i, vector in enumerate(vectors) if vector is None]
        if len(with_text) < len(kept):  # some kept only their embedding: embed the others alike
            for i, vector in zip(with_text, self.embed([kept[i][2] for i in with_text]) if with_text else []):
                vectors[i] = vector
            embeddings = np.stack(vectors).astype(np.float32)
        return FeedbackOutcomes(data=data, embeddings=embeddings, embedder=current, skipped=len(rows) - len(kept))

    def _embedder_name(self) -> str:
        return embedder_name(self.embed)


def parse_since(value: str | None) -> datetime | None:
    """`7d`, `12h`, `30m` before now, or an ISO date / date-time (UTC unless it says otherwise)."""
    if value is None:
        return None
    units = {"d": "days", "h": "hours", "m": "minutes"}
    number, unit = value[:-1], value[-1:]
    if unit in units and number.replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(**{units[unit]: float(number)})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CoeError(f"--since {value!r} is neither a duration nor a date", "use 7d, 12h, 30m or 2026-01-31") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
