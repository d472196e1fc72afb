"""One key store for every ingress replica (deploy/keys.py shared_key_store): two ingress-like
Ray actors, each with its own KeyGate, share one requests/minute limit and one budget, and the
store's budget survives the actor's crash. Starts Ray: run with `heavy --ray`."""

import time
import uuid

import pytest

from deploy.keys import KeyGate, KeySpec, key_hash, shared_key_store

ray = pytest.importorskip("ray")

ALICE = "sk-alice-0123456789"
KEYS = [KeySpec(name="alice", key_sha256=key_hash(ALICE), requests_per_minute=6, budget={"dollars": 1.0, "period": "month"})]


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@ray.remote(num_cpus=0)
class IngressLike:
    """What an ingress replica does with keys: its own gate over the cluster's one store."""

    def __init__(self, db_path: str, store_name: str):
        self.gate = KeyGate(KEYS, shared_key_store(KEYS, db_path, name=store_name))

    async def call(self, cost: float) -> str:
        from deploy.keys import KeyDenied

        key = self.gate.authorize(f"Bearer {ALICE}", "coe")
        try:
            await self.gate.admit(key, 10)
        except KeyDenied as exc:
            return exc.denial.code
        await self.gate.record(key, "smollm2-math", 6, 4, cost)
        return "ok"


def test_two_ingress_replicas_share_limits_and_budget_across_a_store_restart(ray_session, tmp_path):
    store_name = f"coe-keys-test-{uuid.uuid4().hex[:8]}"
    db = str(tmp_path / "usage.sqlite")
    replicas = [IngressLike.remote(db, store_name) for _ in range(2)]
    statuses = ray.get([replicas[i % 2].call.remote(0.0) for i in range(10)])
    assert sorted(statuses) == ["ok"] * 6 + ["rate_limit_exceeded"] * 4  # 6 a minute for both replicas together

    store = ray.get_actor(store_name, namespace="coe")
    ray.get(store.record.remote("alice", "smollm2-math", 100, 50, 1.25))  # past the month's $1
    ray.kill(store, no_restart=False)  # a crash: Ray restarts it, from the same SQLite file
    deadline, statuses = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        statuses = ray.get([r.call.remote(0.0) for r in replicas])
        if "key_store_unavailable" not in statuses:  # a 503 while the store restarts
            break
    assert statuses == ["budget_exceeded"] * 2  # the minute's window restarted empty; the spend did not
    usage = ray.get(store.usage.remote())["data"][0]
    assert usage["budget"]["spent"] == pytest.approx(1.25) and usage["requests"] == 7
    ray.kill(store, no_restart=True)
