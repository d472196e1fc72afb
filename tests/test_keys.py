"""API keys (deploy/keys.py): names, limits, budgets, usage and their persistence, on the store
itself with an injected clock, and through a real in-process FastAPI app wired as the ingress is.
No model, no Ray: milliseconds. tests/test_keys_ray.py shares one store between processes."""

import json
import logging
from datetime import UTC, datetime

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from core.config import CoeConfig, ServeConfig, load_config
from core.errors import ConfigError
from deploy.keys import (
    Denial,
    KeyDenied,
    KeyGate,
    KeyInfo,
    KeySpec,
    KeyStore,
    estimate_tokens,
    key_hash,
    load_keys,
    model_target,
    period_bounds,
)

ALICE, BOB, ROOT = "sk-alice-0123456789", "sk-bob-0123456789", "sk-root-0123456789"


class Clock:
    def __init__(self, iso: str):
        self.now = datetime.fromisoformat(iso).timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spec(name: str, key: str, **limits) -> KeySpec:
    return KeySpec(name=name, key_sha256=key_hash(key), **limits)


def write_keys(tmp_path, keys: list[dict], suffix=".yaml"):
    path = tmp_path / f"keys{suffix}"
    path.write_text(json.dumps({"keys": keys}))  # JSON is YAML too
    return path


# -- loading ------------------------------------------------------------------------------------


def test_keys_file_and_bare_keys_load_with_names(tmp_path, monkeypatch):
    path = write_keys(tmp_path, [
        {"name": "alice", "key": ALICE, "requests_per_minute": 5, "budget": {"dollars": 2.5, "period": "week"},
         "policies": ["knn"], "experts": ["smollm2-math"]},
        {"name": "ops", "key_sha256": key_hash(ROOT), "admin": True},
    ], suffix=".json")
    monkeypatch.setenv("COE_API_KEYS", " sk-env-1 ,sk-env-2,")
    keys = load_keys(ServeConfig(keys_file=path, api_keys=["sk-config"]))
    assert [k.name for k in keys] == ["alice", "ops", "key-1", "key-2", "key-3"]
    alice = keys[0]
    assert alice.requests_per_minute == 5 and alice.budget.dollars == 2.5 and alice.budget.period == "week"
    assert alice.key_sha256 == key_hash(ALICE) and ALICE not in alice.model_dump_json()  # only the hash is kept
    assert keys[2].key_sha256 == key_hash("sk-config") and keys[3].key_sha256 == key_hash("sk-env-1")
    assert all(k.admin for k in keys[2:]) and keys[2].requests_per_minute is None  # bare keys: as before, no limits


def test_the_example_keys_file_loads(monkeypatch):
    from core.paths import REPO_ROOT

    monkeypatch.delenv("COE_API_KEYS", raising=False)
    keys = load_keys(ServeConfig(keys_file=REPO_ROOT / "deploy" / "keys.example.yaml"))
    assert [k.name for k in keys] == ["ops", "team-a"] and keys[0].admin and keys[1].budget.dollars == 25
    assert KeyStore(keys).authorize("sk-team-a-change-me", "coe-knn").name == "team-a"


def test_bad_keys_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_keys(ServeConfig(keys_file=tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys:\n  - name: a\n    key: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_keys(ServeConfig(keys_file=bad))
    with pytest.raises(ConfigError, match=r"keys\.0\.requests_per_minute"):
        load_keys(ServeConfig(keys_file=write_keys(tmp_path, [{"name": "a", "key": ALICE, "requests_per_minute": 0}])))
    with pytest.raises(ConfigError, match="exactly one of key or key_sha256"):
        load_keys(ServeConfig(keys_file=write_keys(tmp_path, [{"name": "a"}])))
    with pytest.raises(ConfigError, match="key names given twice: a"):
        load_keys(ServeConfig(keys_file=write_keys(tmp_path, [{"name": "a", "key": ALICE}, {"name": "a", "key": BOB}])))
    with pytest.raises(ConfigError, match="same key is configured twice"):
        load_keys(ServeConfig(keys_file=write_keys(tmp_path, [{"name": "a", "key": ALICE}]), api_keys=[ALICE]))


def test_config_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "coe.yaml").write_text("serve:\n  keys_file: keys.yaml\n  usage_db: state/usage.sqlite\n"
                                       "  cache: {enabled: true, path: cache.sqlite}\n")
    serve = load_config(tmp_path / "coe.yaml").serve
    assert serve.keys_file == tmp_path / "keys.yaml" and serve.usage_db == tmp_path / "state" / "usage.sqlite"
    assert serve.cache.path == tmp_path / "cache.sqlite"


# -- authorization ------------------------------------------------------------------------------


def test_authorize_by_key_and_model():
    store = KeyStore([spec("alice", ALICE, policies=["knn"], experts=["smollm2-math"]), spec("ops", ROOT, admin=True)],
                     default_policy="knn", policy_names=["knn", "coe", "symbolic"])
    alice = store.authorize(ALICE, "coe")
    assert isinstance(alice, KeyInfo) and alice.name == "alice" and not alice.admin
    assert not hasattr(alice, "key_sha256")
    for allowed in ("coe-knn", "knn", "coe-knn@0.3", "smollm2-math"):
        assert isinstance(store.authorize(ALICE, allowed), KeyInfo), allowed
    denied = store.authorize(ALICE, "coe-symbolic")
    assert isinstance(denied, Denial) and denied.status == 403 and denied.param == "model"
    assert "'symbolic'" in denied.message and "coe-knn, smollm2-math" in denied.message
    assert store.authorize(ALICE, "smollm2-science").status == 403
    assert store.authorize(ROOT, "smollm2-science").name == "ops"  # no lists: everything
    for wrong in ("", "sk-alice-012345678", ALICE + "x", ROOT.upper()):
        verdict = store.authorize(wrong, "coe")
        assert isinstance(verdict, Denial) and verdict.status == 401 and verdict.code == "invalid_api_key"
    open_store = KeyStore([])  # no key configured: auth is off, as today
    assert open_store.authorize("", "anything").name == "anonymous"
    assert open_store.admit("anonymous", 10**6) is None


def test_model_target_reads_models_as_the_pipeline_does():
    policies = ["knn", "coe", "glider"]
    assert model_target("coe", "knn", policies) == ("policy", "knn")
    assert model_target("coe-coe", "knn", policies) == ("policy", "coe")
    assert model_target("glider", "knn", policies) == ("policy", "glider")
    assert model_target("coe-glider@0.2", "knn", policies) == ("policy", "glider")
    assert model_target("smollm2-math", "knn", policies) == ("expert", "smollm2-math")


# -- limits -------------------------------------------------------------------------------------


def test_requests_per_minute_trip_at_the_limit_with_retry_after():
    clock = Clock("2026-03-04T12:00:00+00:00")
    store = KeyStore([spec("alice", ALICE, requests_per_minute=3), spec("bob", BOB)], clock=clock)
    assert [store.admit("alice") for _ in range(3)] == [None, None, None]
    clock.advance(20)
    denied = store.admit("alice")
    assert denied.status == 429 and denied.code == "rate_limit_exceeded" and "3 requests per minute" in denied.message
    assert denied.retry_after == 40 and denied.headers() == {"retry-after": "40"}
    assert store.admit("bob") is None  # limits are per key
    assert store.admit("alice").status == 429  # a refused request does not count, but does not pass either
    clock.advance(40)  # the first three leave the window together
    assert [store.admit("alice") for _ in range(3)] == [None, None, None]
    assert store.admit("alice").status == 429
    assert store.admit("nobody").status == 401


def test_tokens_per_minute_count_recorded_tokens_and_the_estimate():
    clock = Clock("2026-03-04T12:00:00+00:00")
    store = KeyStore([spec("alice", ALICE, tokens_per_minute=1000)], clock=clock)
    assert store.admit("alice", 300) is None
    store.record("alice", "smollm2-math", 200, 100, 0.0)
    clock.advance(10)
    assert store.admit("alice", 300) is None
    store.record("alice", "smollm2-math", 400, 200, 0.0)  # 900 in the window now
    clock.advance(5)
    denied = store.admit("alice", 200)
    assert denied.status == 429 and "1000 tokens per minute" in denied.message
    assert denied.retry_after == 45  # the first 300 leave at t=60, 15 s are gone: then 600 + 200 fit
    assert store.admit("alice", 100) is None  # what fits still runs
    too_large = store.admit("alice", 1001)
    assert too_large.status == 429 and too_large.code == "request_too_large"
    clock.advance(45)
    assert store.admit("alice", 200) is None
    assert estimate_tokens(prompt_chars=400, max_tokens=50) == 150


def test_a_spent_budget_refuses_until_the_period_rolls_over():
    clock = Clock("2026-03-04T23:00:00+00:00")
    store = KeyStore([spec("alice", ALICE, budget={"dollars": 1.0, "period": "day"})], clock=clock)
    assert store.admit("alice") is None
    store.record("alice", "smollm2-math", 10, 10, 0.6)
    assert store.admit("alice") is None
    store.record("alice", "smollm2-science", 10, 10, 0.5)  # the last request may overshoot; the next may not run
    clock.advance(30 * 60)
    denied = store.admit("alice")
    assert denied.status == 429 and denied.code == "budget_exceeded" and "$1 this day" in denied.message
    assert denied.retry_after == 30 * 60  # until midnight UTC
    budget = store.usage()["data"][0]["budget"]
    assert budget["spent"] == pytest.approx(1.1) and budget["remaining"] == 0 and budget["resets_at"].startswith("2026-03-05T00:00")
    clock.advance(29 * 60)
    assert store.admit("alice").status == 429
    clock.advance(61)  # 00:00:01 the next day
    assert store.admit("alice") is None
    assert store.usage()["data"][0]["budget"]["spent"] == 0
    assert store.usage()["data"][0]["cost"] == pytest.approx(1.1)  # usage totals do not roll over


def test_period_bounds_are_utc_calendar_periods():
    wednesday = datetime(2026, 3, 4, 15, 30, tzinfo=UTC).timestamp()
    assert [d.isoformat()[:10] for d in period_bounds("day", wednesday)] == ["2026-03-04", "2026-03-05"]
    assert [d.isoformat()[:10] for d in period_bounds("week", wednesday)] == ["2026-03-02", "2026-03-09"]
    assert [d.isoformat()[:10] for d in period_bounds("month", wednesday)] == ["2026-03-01", "2026-04-01"]
    december = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    assert [d.isoformat()[:10] for d in period_bounds("month", december)] == ["2026-12-01", "2027-01-01"]


def test_budget_and_usage_survive_a_restart(tmp_path):
    db = tmp_path / "usage.sqlite"
    clock = Clock("2026-03-04T09:00:00+00:00")
    keys = [spec("alice", ALICE, budget={"dollars": 0.5, "period": "month"}), spec("bob", BOB)]
    first = KeyStore(keys, db, clock=clock)
    first.record("alice", "smollm2-math", 100, 20, 0.3)
    first.record("alice", "smollm2-math", 50, 10, 0.3)
    first.record("bob", "smollm2-science", 7, 3, 0.01)
    assert first.admit("alice").code == "budget_exceeded"
    first.close()
    clock.advance(7 * 86400)  # a week later, same month
    second = KeyStore(keys, db, clock=clock)
    assert second.admit("alice").code == "budget_exceeded"
    usage = {e["key"]: e for e in second.usage()["data"]}
    assert usage["alice"]["experts"] == [{"expert": "smollm2-math", "requests": 2, "prompt_tokens": 150, "completion_tokens": 30,
                                          "total_tokens": 180, "cost": pytest.approx(0.6)}]
    assert usage["bob"]["requests"] == 1 and usage["bob"]["total_tokens"] == 10
    # the period is config: moving alice to a daily budget counts only today's spend (none)
    second.configure([spec("alice", ALICE, budget={"dollars": 0.5, "period": "day"}), spec("bob", BOB)])
    assert second.admit("alice") is None


def test_an_unreadable_usage_database_is_an_error_not_a_reset(tmp_path):
    db = tmp_path / "usage.sqlite"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="cannot be read"):
        KeyStore([spec("alice", ALICE)], db)


# -- through an HTTP app, as the ingress wires it ----------------------------------------------


def keyed_app(gate: KeyGate) -> FastAPI:
    """A minimal ingress: authorize + admit before the work, record after, usage for admins."""
    app = FastAPI()

    @app.exception_handler(KeyDenied)
    async def _denied(request: Request, exc: KeyDenied):
        return exc.denial.response()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        key = gate.authorize(request.headers.get("authorization", ""), body["model"])
        await gate.admit(key, estimate_tokens(len(body["messages"][-1]["content"]), body.get("max_tokens", 16)))
        await gate.record(key, "smollm2-math", 12, body.get("max_tokens", 16), 0.25)
        return {"answered": True}

    @app.get("/v1/usage")
    async def usage(request: Request) -> dict:
        return await gate.usage(gate.authorize(request.headers.get("authorization", "")))

    return app


def test_limits_and_usage_through_a_real_app(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("COE_API_KEYS", raising=False)
    keys_file = write_keys(tmp_path, [
        {"name": "alice", "key": ALICE, "requests_per_minute": 2, "policies": ["knn"]},
        {"name": "bob", "key": BOB, "budget": {"dollars": 0.5, "period": "day"}},
    ])
    config = CoeConfig.model_validate({"serve": {"keys_file": str(keys_file), "usage_db": str(tmp_path / "u.sqlite"),
                                                 "api_keys": [ROOT]}})
    http = TestClient(keyed_app(KeyGate.from_config(config)))

    def ask(key, model="coe"):
        return http.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={"model": model, "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 4})

    with caplog.at_level(logging.DEBUG):
        assert [ask(ALICE).status_code for _ in range(2)] == [200, 200]
        limited = ask(ALICE)
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.json()["error"]["type"] == "rate_limit_error" and limited.json()["error"]["code"] == "rate_limit_exceeded"
        forbidden = ask(ALICE, "coe-glider")
        assert forbidden.status_code == 403 and forbidden.json()["error"]["param"] == "model"
        assert ask("sk-wrong-0123456789").status_code == 401 and ask("").status_code == 401
        assert [ask(BOB).status_code for _ in range(3)] == [200, 200, 429]  # 2 x $0.25 spends $0.5
        assert ask(BOB).json()["error"]["code"] == "budget_exceeded"
        mine = http.get("/v1/usage", headers={"authorization": f"Bearer {BOB}"}).json()["data"]
        assert [e["key"] for e in mine] == ["bob"] and mine[0]["requests"] == 2 and mine[0]["cost"] == pytest.approx(0.5)
        every = http.get("/v1/usage", headers={"authorization": f"Bearer {ROOT}"}).json()["data"]  # key-1 is admin
        assert [e["key"] for e in every] == ["alice", "bob", "key-1"] and every[0]["requests"] == 2
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert all(secret not in logged for secret in (ALICE, BOB, ROOT))
