"""API keys with names, limits, budgets and usage, shared by every ingress replica.

A key has a name (what logs, usage and metrics show: the key itself is kept only as its SHA-256),
optional requests/minute and tokens/minute limits, a spend budget in dollars per calendar period
(UTC day, ISO week from Monday, month), the policies and experts it may name, and an admin flag
(usage of every key). Keys come from `serve.keys_file` (YAML or JSON) and, as today, from
`serve.api_keys` and COE_API_KEYS (bare keys, named key-1, key-2, ... with no limits, admin).

KeyStore keeps the counters. In-process it runs as it is; on Serve one named Ray actor
(`shared_key_store`) runs the same class for every ingress replica, so a limit holds across
replicas. Usage totals and the spend of each day live in SQLite, so a restart resets no budget;
the per-minute windows live in memory (a restart forgets at most a minute of them).
KeyGate is what the ingress calls: `authorize` in the ingress itself (the key table is config, so
no round trip), `admit`, `record` and `usage` on the store; denials raise KeyDenied (401, 403,
429 with retry_after).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.config import CoeConfig, ServeConfig, validated_yaml
from core.errors import CoeError, ConfigError
from deploy.openai_api import error_body

logger = logging.getLogger("coe.keys")

WINDOW_SECONDS = 60.0  # the "minute" of requests/minute and tokens/minute: a sliding window
ANONYMOUS = "anonymous"  # the caller when no key is configured (auth off)
STORE_ACTOR = "coe-keys"
STORE_NAMESPACE = "coe"
Period = Literal["day", "week", "month"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    dollars: float = Field(ge=0)
    period: Period = "month"


class KeyInfo(_Strict):
    """What a request's key may do; never the key itself."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@:-]{1,64}$")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    budget: Budget | None = None
    policies: list[str] | None = None  # None: every policy (coe, coe-<policy>, <policy>)
    experts: list[str] | None = None  # None: every expert, by name
    admin: bool = False


class KeySpec(KeyInfo):
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class KeyEntry(KeyInfo):
    """One key in a keys file: the key in clear (`key`) or only its hash (`key_sha256`)."""

    key: str | None = Field(None, min_length=8)
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one_key(self) -> KeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    def spec(self) -> KeySpec:
        digest = self.key_sha256 or key_hash(self.key)
        return KeySpec(**self.model_dump(exclude={"key", "key_sha256"}), key_sha256=digest)


class KeysFile(_Strict):
    keys: list[KeyEntry] = Field(min_length=1)


class Denial(_Strict):
    """Why a request may not go on, as the ingress answers it (OpenAI error format)."""

    status: int
    message: str
    code: str
    param: str | None = None
    retry_after: int | None = None  # seconds, for the Retry-After header of a 429

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)} if self.retry_after is not None else {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.status, self.param, self.code), self.status, headers=self.headers())


class KeyDenied(CoeError):
    """A Denial raised in the ingress; the app's handler turns it into the error response."""

    def __init__(self, denial: Denial):
        super().__init__(denial.message)
        self.denial = denial
        self.status_code = denial.status


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def estimate_tokens(prompt_chars: int, max_tokens: int) -> int:
    """A request's tokens before it runs, for tokens/minute: about 4 characters a token for the
    prompt, plus every token it may generate (as OpenAI counts it against a limit)."""
    return math.ceil(prompt_chars / 4) + max_tokens


def bearer_token(authorization: str) -> str:
    """The key of an `Authorization: Bearer <key>` header; "" for anything else."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# -- loading ----------------------------------------------------------------------------------


def read_keys_file(path: Path) -> list[KeySpec]:
    if not path.is_file():
        raise ConfigError(f"keys file {path} does not exist", "fix serve.keys_file or create the file")
    keys = validated_yaml(path, KeysFile, "keys file", "YAML or JSON", "fix its syntax", "see deploy/keys.py for the format")
    return [entry.spec() for entry in keys.keys]


def load_keys(serve: ServeConfig) -> list[KeySpec]:
    """Every configured key: the keys file's, then the bare keys of the config and COE_API_KEYS."""
    keys = read_keys_file(serve.keys_file) if serve.keys_file is not None else []
    bare = serve.effective_api_keys()
    keys += [KeySpec(name=f"key-{i}", key_sha256=key_hash(k), admin=True) for i, k in enumerate(bare, 1)]
    names = [k.name for k in keys]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"key names given twice: {', '.join(twice)}", "give every key its own name (bare keys are key-1, key-2, ...)")
    if len({k.key_sha256 for k in keys}) < len(keys):
        raise ConfigError("the same key is configured twice", "give every key its own secret")
    return keys


# -- authorization ----------------------------------------------------------------------------


def model_target(model: str, default_policy: str, policy_names: Iterable[str]) -> tuple[str, str]:
    """("policy", name) or ("expert", name) for a request's `model`, as the pipeline reads it:
    `coe` is the default policy, `coe-<policy>` and `<policy>` a policy, anything else an expert.
    A cost knob (`coe-knn@0.3`) belongs to its policy."""
    policies = set(policy_names)
    name = model.split("@", 1)[0]
    if name == "coe":
        return "policy", default_policy
    if name.startswith("coe-") and (name[4:] in policies or not policies):
        return "policy", name[4:]
    if name in policies:
        return "policy", name
    return "expert", name


class KeyTable:
    """The configured keys, looked up in constant time per key: the presented key's hash is
    compared with every configured hash, so the time taken tells nothing about which matched."""

    def __init__(self, keys: list[KeySpec], default_policy: str = "knn", policy_names: Iterable[str] = ()):
        self.keys = list(keys)
        self.by_name = {k.name: k for k in self.keys}
        self.default_policy = default_policy
        self.policy_names = list(policy_names)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authorize(self, key: str, model: str | None) -> KeyInfo | Denial:
        if not self.keys:
            return KeyInfo(name=ANONYMOUS, admin=True)
        digest = key_hash(key).encode()
        found = None
        for spec in self.keys:
            if hmac.compare_digest(digest, spec.key_sha256.encode()) and key:
                found = spec
        if found is None:
            return Denial(status=401, message="invalid or missing API key; send Authorization: Bearer <key>",
                          code="invalid_api_key")
        info = KeyInfo(**found.model_dump(exclude={"key_sha256"}))
        if model is None:
            return info
        kind, name = model_target(model, self.default_policy, self.policy_names)
        allowed = info.policies if kind == "policy" else info.experts
        if allowed is not None and name not in allowed:
            may = [*(f"coe-{p}" for p in info.policies or []), *(info.experts or [])]
            return Denial(status=403, param="model", code="model_not_allowed",
                          message=f"key {info.name!r} may not use {kind} {name!r}; it may use: {', '.join(may) or 'nothing'}")
        return info


# -- the store --------------------------------------------------------------------------------


def period_bounds(period: Period, now: float) -> tuple[datetime, datetime]:
    """The UTC calendar period holding `now`: [start, end)."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


class _Window:
    """Amounts within the last WINDOW_SECONDS (a sliding window: no burst at a minute boundary)."""

    def __init__(self):
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def prune(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW_SECONDS:
            self.total -= self.events.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        self.events.append((now, amount))
        self.total += amount

    def seconds_until_room(self, now: float, needed: int, limit: int) -> int:
        """Whole seconds until the window holds at most `limit - needed` (events expire in order)."""
        excess = self.total + needed - limit
        for at, amount in self.events:
            excess -= amount
            if excess <= 0:
                return max(1, math.ceil(at + WINDOW_SECONDS - now))
        return math.ceil(WINDOW_SECONDS)


class _UsageDb:
    """Usage totals per key and expert, and the spend of each key per UTC day (a period's spend
    is the sum of its days, so changing a key's period keeps what it has spent)."""

    def __init__(self, path: Path | None):
        target = str(path) if path is not None else ":memory:"
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(target, check_same_thread=False)
            if path is not None:
                self.conn.execute("PRAGMA journal_mode=WAL")
            with self.conn:
                self.conn.execute("CREATE TABLE IF NOT EXISTS usage (key TEXT, expert TEXT, requests INTEGER, "
                                  "prompt_tokens INTEGER, completion_tokens INTEGER, cost REAL, PRIMARY KEY (key, expert))")
                self.conn.execute("CREATE TABLE IF NOT EXISTS spend (key TEXT, day TEXT, cost REAL, PRIMARY KEY (key, day))")
        except sqlite3.DatabaseError as exc:
            # Never start afresh in silence: that would reset every budget.
            raise ConfigError(f"usage database {path} cannot be read ({exc})",
                              "restore it from a backup, or move it away to start every budget afresh") from None

    def add(self, key: str, expert: str, prompt_tokens: int, completion_tokens: int, cost: float, day: str) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO usage VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT (key, expert) DO UPDATE SET "
                "requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens, cost = cost + excluded.cost",
                (key, expert, prompt_tokens, completion_tokens, cost))
            if cost:
                self.conn.execute("INSERT INTO spend VALUES (?, ?, ?) ON CONFLICT (key, day) DO UPDATE SET "
                                  "cost = cost + excluded.cost", (key, day, cost))

    def spent(self, key: str, since_day: str) -> float:
        row = self.conn.execute("SELECT COALESCE(SUM(cost), 0) FROM spend WHERE key = ? AND day >= ?", (key, since_day)).fetchone()
        return float(row[0])

    def rows(self) -> list[tuple]:
        return self.conn.execute("SELECT key, expert, requests, prompt_tokens, completion_tokens, cost FROM usage "
                                 "ORDER BY key, expert").fetchall()

    def close(self) -> None:
        self.conn.close()


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d")


class KeyStore:
    """Limits, budgets and usage of every key. The same class runs in-process and as the shared
    Ray actor; every method is safe to call from several threads."""

    def __init__(self, keys: list[KeySpec], db_path: str | Path | None = None, default_policy: str = "knn",
                 policy_names: Iterable[str] = (), clock: Callable[[], float] = time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self._db = _UsageDb(Path(db_path) if db_path is not None else None)
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}
        self.configure(keys, default_policy, policy_names)

    def configure(self, keys: list[KeySpec], default_policy: str = "knn", policy_names: Iterable[str] = ()) -> None:
        """Take a new key table (a redeploy with another keys file); counters and usage stay."""
        with self._lock:
            self.table = KeyTable(keys, default_policy, policy_names)

    def authorize(self, key: str, model: str | None) -> KeyInfo | Denial:
        return self.table.authorize(key, model)

    def admit(self, key_name: str, estimated_tokens: int = 0) -> Denial | None:
        """None when the request may run now (and counts it against requests/minute); else the 429."""
        with self._lock:
            spec = self.table.by_name.get(key_name)
            if spec is None:
                if self.table.enabled:
                    return Denial(status=401, message=f"unknown key {key_name!r}", code="invalid_api_key")
                return None
            now = self.clock()
            if spec.budget is not None:
                start, end = period_bounds(spec.budget.period, now)
                spent = self._db.spent(spec.name, _day(start))
                if spent >= spec.budget.dollars:
                    return Denial(status=429, code="budget_exceeded", retry_after=max(1, math.ceil(end.timestamp() - now)),
                                  message=f"key {spec.name!r} has spent its budget of ${spec.budget.dollars:g} this "
                                          f"{spec.budget.period} (${spent:.4f}); it renews at {end.isoformat()}")
            requests = self._requests.setdefault(spec.name, _Window())
            requests.prune(now)
            if spec.requests_per_minute is not None and requests.total + 1 > spec.requests_per_minute:
                return Denial(status=429, code="rate_limit_exceeded",
                              retry_after=requests.seconds_until_room(now, 1, spec.requests_per_minute),
                              message=f"key {spec.name!r} is over its limit of {spec.requests_per_minute} requests per minute")
            tokens = self._tokens.setdefault(spec.name, _Window())
            tokens.prune(now)
            if spec.tokens_per_minute is not None:
                if estimated_tokens > spec.tokens_per_minute:
                    return Denial(status=429, code="request_too_large", retry_after=math.ceil(WINDOW_SECONDS),
                                  message=f"this request needs about {estimated_tokens} tokens, more than key {spec.name!r}'s "
                                          f"limit of {spec.tokens_per_minute} tokens per minute; ask for fewer max_tokens")
                if tokens.total + estimated_tokens > spec.tokens_per_minute:
                    return Denial(status=429, code="rate_limit_exceeded",
                                  retry_after=tokens.seconds_until_room(now, estimated_tokens, spec.tokens_per_minute),
                                  message=f"key {spec.name!r} is over its limit of {spec.tokens_per_minute} tokens per minute")
            requests.add(now, 1)
            return None

    def record(self, key_name: str, expert: str, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        """What one expert's answer to an admitted request used (tokens count against tokens/minute)."""
        with self._lock:
            now = self.clock()
            self._tokens.setdefault(key_name, _Window()).add(now, prompt_tokens + completion_tokens)
            self._db.add(key_name, expert, prompt_tokens, completion_tokens, cost, _day(datetime.fromtimestamp(now, UTC)))

    def usage(self, key_name: str | None = None) -> dict:
        """Per key: requests, tokens and cost per expert, and the budget of its current period.
        `key_name`: that key only (what a key that is not admin may see of itself)."""
        with self._lock:
            now = self.clock()
            per_key: dict[str, dict] = {}
            for spec in self.table.keys:
                per_key[spec.name] = {"key": spec.name, "budget": self._budget(spec, now), "experts": []}
            for key, expert, requests, prompt, completion, cost in self._db.rows():
                entry = per_key.setdefault(key, {"key": key, "budget": None, "experts": []})
                entry["experts"].append({"expert": expert, "requests": requests, "prompt_tokens": prompt,
                                         "completion_tokens": completion, "total_tokens": prompt + completion,
                                         "cost": round(cost, 8)})
        data = [e for name, e in sorted(per_key.items()) if key_name is None or name == key_name]
        for entry in data:
            for total in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost"):
                entry[total] = sum(e[total] for e in entry["experts"])
        return {"object": "list", "data": data}

    def _budget(self, spec: KeySpec, now: float) -> dict | None:
        if spec.budget is None:
            return None
        start, end = period_bounds(spec.budget.period, now)
        spent = self._db.spent(spec.name, _day(start))
        return {"dollars": spec.budget.dollars, "period": spec.budget.period, "spent": round(spent, 8),
                "remaining": round(max(0.0, spec.budget.dollars - spent), 8), "resets_at": end.isoformat()}

    def close(self) -> None:
        self._db.close()


def default_usage_db(serve: ServeConfig) -> Path:
    from core.paths import cache_dir

    return serve.usage_db or cache_dir() / "usage.sqlite"


def shared_key_store(keys: list[KeySpec], db_path: str | Path, default_policy: str = "knn",
                     policy_names: Iterable[str] = (), name: str = STORE_ACTOR):
    """The one KeyStore of a Ray cluster, as a named detached actor: the first caller creates it,
    every later one (each ingress replica) gets the same and hands it the current key table. Its
    usage lives in `db_path` on the node it runs on; Ray restarts it after a crash, from that file."""
    import ray

    actor = ray.remote(KeyStore).options(name=name, namespace=STORE_NAMESPACE, lifetime="detached", get_if_exists=True,
                                         num_cpus=0, max_restarts=-1, max_concurrency=1)
    handle = actor.remote(keys, str(db_path), default_policy, list(policy_names))
    ray.get(handle.configure.remote(keys, default_policy, list(policy_names)))
    return handle


def store_errors() -> tuple[type[Exception], ...]:
    """What a store call raises when the store, not the request, is at fault."""
    from ray.exceptions import RayError

    return sqlite3.Error, OSError, RayError


class KeyGate:
    """What the ingress calls for keys: authorize here, admit/record/usage on the store (a local
    KeyStore or the shared actor). Denials raise KeyDenied."""

    def __init__(self, keys: list[KeySpec], store, default_policy: str = "knn", policy_names: Iterable[str] = ()):
        self.table = KeyTable(keys, default_policy, policy_names)
        self.store = store
        self._remote = hasattr(getattr(store, "admit", None), "remote")

    @classmethod
    def from_config(cls, config: CoeConfig, shared: bool = False) -> KeyGate:
        """`shared`: the store is the cluster's Ray actor (on Serve); else a KeyStore in this process."""
        keys = load_keys(config.serve)
        db = default_usage_db(config.serve)
        policies = list(config.policies)
        if shared:
            store = shared_key_store(keys, db, config.default_policy, policies)
        else:
            store = KeyStore(keys, db, config.default_policy, policies)
        return cls(keys, store, config.default_policy, policies)

    @classmethod
    def bare(cls, api_keys: list[str]) -> KeyGate:
        """Bare keys without limits (admin), counted in this process only; none: no auth."""
        keys = [KeySpec(name=f"key-{i}", key_sha256=key_hash(k), admin=True) for i, k in enumerate(api_keys, 1)]
        return cls(keys, KeyStore(keys))

    @property
    def enabled(self) -> bool:
        return self.table.enabled

    def authorize(self, authorization: str, model: str | None = None) -> KeyInfo:
        """The key of an Authorization header (`Bearer <key>`), allowed to use `model` (None: any)."""
        verdict = self.table.authorize(bearer_token(authorization), model)
        if isinstance(verdict, Denial):
            raise KeyDenied(verdict)
        return verdict

    async def _call(self, method: str, *args):
        if self._remote:
            return await getattr(self.store, method).remote(*args)
        return getattr(self.store, method)(*args)

    async def admit(self, key: KeyInfo, estimated_tokens: int = 0) -> None:
        try:
            denial = await self._call("admit", key.name, estimated_tokens)
        except store_errors() as exc:  # the shared store is restarting: refuse rather than run past a limit
            logger.warning("key store unavailable: %s", type(exc).__name__)
            denial = Denial(status=503, code="key_store_unavailable", retry_after=1,
                            message="the key store is unavailable; retry after a moment")
        if denial is not None:
            raise KeyDenied(denial)

    async def record(self, key: KeyInfo, expert: str, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        try:
            await self._call("record", key.name, expert, prompt_tokens, completion_tokens, cost)
        except store_errors() as exc:  # the answer is out already; say what was not counted (never the key)
            logger.warning("usage of key %r not recorded (%s tokens, $%.6f): %s", key.name,
                           prompt_tokens + completion_tokens, cost, type(exc).__name__)

    async def usage(self, key: KeyInfo | None = None) -> dict:
        """Every key's usage for an admin key (and for None: the /metrics scrape), else the key's own."""
        return await self._call("usage", None if key is None or key.admin else key.name)
