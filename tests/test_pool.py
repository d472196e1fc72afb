"""The tiered memory pool and the planner: pure Python, milliseconds (no model is loaded)."""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import CoeConfig, PoolConfig
from core.errors import PoolCapacityError
from core.types import Decision, ExpertScore, PoolState
from experts.pool import Move, SimulatedMover, TierBudgets, TieredPool
from orchestrator import planner


class RecordingMover:
    """Records every move and checks, at the moment of each move, the pool's own invariants."""

    def __init__(self, pool_ref: list, delay: float = 0.0):
        self.moves: list[Move] = []
        self.on_device: set[str] = set()
        self.children: dict[str, set[str]] = {}
        self.pool_ref = pool_ref
        self.delay = delay
        self.lock = threading.Lock()

    def move(self, move: Move) -> float:
        """Keeps its own view of the device, as a real mover would (a base's model, its adapters)."""
        pool: TieredPool = self.pool_ref[0]
        if move.source == "device":  # never evict a pinned expert
            assert pool.pins(move.expert) == 0, f"pinned {move.expert} evicted"
        with self.lock:
            if move.target == "device":
                assert move.parent is None or move.parent in self.on_device, f"{move.expert} loaded without its base"
                self.on_device.add(move.expert)
            if move.source == "device":
                assert not self.children.get(move.expert, set()) & self.on_device, f"{move.expert} left with adapters on it"
                self.on_device.discard(move.expert)
            if move.parent:
                self.children.setdefault(move.parent, set()).add(move.expert)
            self.moves.append(move)
        if self.delay:
            time.sleep(self.delay)
        with self.lock:  # still true once the move is done
            assert move.parent is None or move.target != "device" or move.parent in self.on_device
        return 0.001


def make_pool(device: int, host: int, sizes: dict[str, int], parents: dict[str, str] | None = None,
              delay: float = 0.0, **kwargs) -> tuple[TieredPool, RecordingMover]:
    ref: list = []
    mover = RecordingMover(ref, delay)
    pool = TieredPool(TierBudgets(device=device, host=host), mover, **kwargs)
    ref.append(pool)
    parents = parents or {}
    for name in sorted(sizes, key=lambda n: n in parents):
        pool.add(name, sizes[name], parent=parents.get(name))
    return pool, mover


def loads_of(mover: RecordingMover) -> list[str]:
    return [m.expert for m in mover.moves if m.target == "device"]


def decision(qid, *experts, k=1, aggregator="passthrough"):
    ranked = [ExpertScore(expert=e, score=1.0 - i / 10) for i, e in enumerate(experts)]
    return Decision(query_id=qid, policy="test", ranked=ranked, k=k, aggregator=aggregator)


# -- pool: tiers, budgets, eviction -----------------------------------------------------------


def test_moves_go_disk_host_device_and_back_within_budgets():
    pool, mover = make_pool(device=10, host=12, sizes={"a": 6, "b": 6})
    with pool.pinned(["a"]) as acquired:
        assert pool.tier("a") == "device" and acquired.moved > 0
    assert [m.edge for m in mover.moves] == ["disk->host", "host->device"]
    with pool.pinned(["b"]):
        pass
    assert pool.residence() == {"a": "host", "b": "device"}  # a offloaded to host, not dropped
    stats = pool.stats()
    assert stats.loads == 2 and stats.evictions == 1
    assert stats.bytes_moved == {"disk->host": 12, "host->device": 12, "device->host": 6}
    assert stats.load_seconds == pytest.approx(0.004) and stats.per_expert["a"].loads == 1
    assert pool.usage()["device"]["resident"] == 6 and pool.usage()["host"]["resident"] == 6


def test_host_full_drops_victims_to_disk():
    pool, mover = make_pool(device=6, host=6, sizes={"a": 6, "b": 6})
    with pool.pinned(["a"]):
        pass
    with pool.pinned(["b"]):
        pass  # b passes through host, so a cannot stay there: dropped to disk
    assert pool.residence() == {"a": "disk", "b": "device"}
    assert ("device->disk" in {m.edge for m in mover.moves})


def test_belady_evicts_the_farthest_next_use_lru_without_a_plan():
    sizes = {"a": 1, "b": 1, "c": 1, "d": 1}
    # LRU: a, b, c loaded in that order, then d evicts the least recently used: a.
    pool, _ = make_pool(device=3, host=1, sizes=sizes)
    for name in "abcd":
        with pool.pinned([name]):
            pass
    assert pool.tier("a") == "disk" and {pool.tier(n) for n in "bcd"} == {"device"}
    # Belady: the plan says a comes next, then b; c is never used again: c goes, not a.
    pool, _ = make_pool(device=3, host=1, sizes=sizes)
    for name in "abc":
        with pool.pinned([name]):
            pass
    with pool.announce(["d", "a", "b"]):
        with pool.pinned(["d"]):
            pass
        assert pool.tier("c") == "disk" and {pool.tier(n) for n in "abd"} == {"device"}


def test_planned_order_loads_each_expert_once_naive_order_thrashes():
    sizes = {e: 1 for e in "abcdef"}
    rng = random.Random(0)
    requests = [rng.choice("abcdef") for _ in range(64)]
    decisions = [decision(f"q{i}", e) for i, e in enumerate(requests)]

    naive, naive_mover = make_pool(device=3, host=1, sizes=sizes)
    for e in requests:
        with naive.pinned([e]):
            pass
    planned, planned_mover = make_pool(device=3, host=1, sizes=sizes)
    batch_plan = planner.plan(decisions, planned.state())
    with planned.announce(batch_plan.order):
        for group in batch_plan.groups:
            with planned.pinned([group.expert]):
                pass
    assert len(loads_of(planned_mover)) == batch_plan.loads == len(set(requests)) == 6
    assert len(loads_of(naive_mover)) > 3 * len(loads_of(planned_mover))


def test_pinned_experts_are_never_evicted_and_overflow_is_an_error():
    pool, _ = make_pool(device=2, host=4, sizes={"a": 1, "b": 1, "c": 1, "big": 3}, wait_timeout=0.2)
    with pool.pinned(["a", "b"]):
        with pytest.raises(PoolCapacityError, match="waited"):
            with pool.pinned(["c"]):  # room only if a or b went, and both are pinned
                pass
        assert pool.tier("a") == pool.tier("b") == "device"
    with pool.pinned(["c"]):
        pass
    with pytest.raises(PoolCapacityError, match="device"):
        with pool.pinned(["big"]):
            pass
    assert pool.pins("a") == pool.pins("b") == pool.pins("c") == 0


def test_a_load_slower_than_the_wait_timeout_keeps_its_waiters():
    """Callers waiting for experts another caller is loading wait for that load however long it
    takes (an engine start on a busy CPU): wait_timeout bounds waits for memory held by pins."""
    pool, mover = make_pool(device=2, host=4, sizes={"a": 1}, delay=0.3, wait_timeout=0.1)
    outcomes: list = []

    def use():
        try:
            with pool.pinned(["a"]):
                outcomes.append("ran")
        except PoolCapacityError as exc:
            outcomes.append(exc)

    callers = [threading.Thread(target=use) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=10)
    assert outcomes == ["ran"] * 3 and loads_of(mover) == ["a"]


def test_an_adapter_needs_its_base_and_leaves_with_it():
    pool, mover = make_pool(device=5, host=10, sizes={"base": 3, "other": 4, "lora1": 1, "lora2": 1},
                            parents={"lora1": "base", "lora2": "base"})
    with pool.pinned(["lora1", "lora2"]):
        assert pool.pins("base") == 1  # pinning an adapter pins its base
    assert [m.expert for m in mover.moves if m.target == "device"][0] == "base"
    with pool.pinned(["other"]):
        pass
    assert pool.residence() == {"base": "host", "other": "device", "lora1": "host", "lora2": "host"}
    edges = [(m.expert, m.edge) for m in mover.moves if m.source == "device"]
    assert edges.index(("lora1", "device->host")) < edges.index(("base", "device->host"))


def test_lora_host_cache_keeps_a_bounded_number_of_adapters():
    sizes = {"base": 3, "other": 3, **{f"l{i}": 1 for i in range(4)}}
    pool, _ = make_pool(device=7, host=100, sizes=sizes, parents={f"l{i}": "base" for i in range(4)}, host_adapters=2)
    with pool.pinned([f"l{i}" for i in range(4)]):
        pass
    with pool.pinned(["other"]):  # evicts base with its four adapters; only two stay on host
        pass
    on_host = [n for n, t in pool.residence().items() if t == "host" and n.startswith("l")]
    assert len(on_host) == 2 and pool.tier("base") == "host"


def test_prefetch_loads_in_the_background_and_pinned_waits_for_it():
    pool, mover = make_pool(device=10, host=10, sizes={"a": 2, "b": 2}, delay=0.05)
    future = pool.prefetch(["b"])
    with pool.pinned(["a"]) as acquired_a:
        pass
    assert future.result(timeout=5) > 0
    with pool.pinned(["b"]) as acquired_b:
        assert acquired_b.moved == 0  # the prefetcher did the work
    assert acquired_a.moved > 0 and len(loads_of(mover)) == 2
    pool.close()


def test_simulated_mover_accounts_bandwidth():
    mover = SimulatedMover()
    gb = 10**9
    assert mover.seconds(Move("x", 50 * gb, "host", "device")) == pytest.approx(1.0)
    assert mover.seconds(Move("x", 7 * gb, "disk", "host")) == pytest.approx(1.0)
    assert mover.seconds(Move("x", 7 * gb, "host", "disk")) == 0.0
    pool = TieredPool(TierBudgets(device=80 * gb, host=400 * gb), mover)
    pool.add("m", 14 * gb)
    with pool.pinned(["m"]):
        pass
    assert pool.stats().load_seconds == pytest.approx(2.0 + 0.28)


def test_budgets_default_from_the_machine_and_config():
    pool = TieredPool.from_config(CoeConfig().pool)
    assert 0 < pool.budgets.host < pool.budgets.device
    pool = TieredPool.from_config(PoolConfig(device_bytes=100, host_bytes=50, host_adapters=3))
    assert (pool.budgets.device, pool.budgets.host, pool.host_adapters) == (100, 50, 3)


def test_failed_move_leaves_the_pool_consistent():
    class Failing:
        def move(self, move):
            if move.expert == "bad" and move.target == "device":
                raise RuntimeError("out of memory")
            return 0.0

    pool = TieredPool(TierBudgets(device=4, host=4), Failing())
    pool.add("bad", 2)
    pool.add("good", 2)
    with pytest.raises(RuntimeError):
        with pool.pinned(["bad"]):
            pass
    assert pool.tier("bad") == "host" and pool.pins("bad") == 0
    assert pool.usage()["device"] == {"resident": 0, "claimed": 0, "budget": 4}
    with pool.pinned(["good"]):
        assert pool.tier("good") == "device"


# -- planner ----------------------------------------------------------------------------------


def test_plan_groups_by_base_resident_first():
    state = PoolState(residence={"c": "device", "base": "host"}, sizes={"a": 5, "b": 7, "c": 1, "base": 10, "l1": 1, "l2": 1},
                      parents={"l1": "base", "l2": "base"})
    decisions = [decision("q1", "a"), decision("q2", "l1"), decision("q3", "a"), decision("q4", "c", "a", k=2, aggregator="vote"),
                 decision("q5", "l2"), decision("q6", "l1"), decision("q7", "l2")]
    batch_plan = planner.plan(decisions, state)
    assert batch_plan.order == ["c", "l1", "l2", "a"]  # resident first, then the base with most work
    assert [[g.expert for g in s] for s in batch_plan.stages()] == [["c"], ["l1", "l2"], ["a"]]
    assert {g.expert: g.query_ids for g in batch_plan.groups}["a"] == ["q1", "q3", "q4"]
    assert batch_plan.loads == 4  # base, l1, l2, a
    assert batch_plan.load_bytes == 10 + 1 + 1 + 5 and batch_plan.read_bytes == 7


expert_names = st.sampled_from([f"e{i}" for i in range(8)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(expert_names, min_size=1, max_size=3, unique=True), min_size=1, max_size=40),
       st.dictionaries(expert_names, st.sampled_from(["device", "host", "disk"])))
def test_plan_properties(choices, residence):
    parents = {"e5": "e0", "e6": "e0", "e7": "e1"}
    for child, parent in parents.items():  # the pool keeps an adapter on the device only with its base
        if residence.get(child) == "device":
            residence[parent] = "device"
    state = PoolState(residence=residence, sizes={f"e{i}": i + 1 for i in range(8)}, parents=parents)
    decisions = [decision(f"q{i}", *experts, k=len(experts)) for i, experts in enumerate(choices)]
    batch_plan = planner.plan(decisions, state)
    order = batch_plan.order
    chosen = {e for experts in choices for e in experts}
    assert sorted(order) == sorted(chosen)  # every chosen expert exactly once
    for i, experts in enumerate(choices):  # every query in the group of each of its experts
        for e in experts:
            assert f"q{i}" in next(g.query_ids for g in batch_plan.groups if g.expert == e)
    bases = [parents.get(e, e) for e in order]
    assert all(b not in bases[i + 1:] for i, b in enumerate(bases) if i + 1 < len(bases) and bases[i + 1] != b)  # a base's experts are contiguous
    on_device = [state.tier(b) == "device" for b in dict.fromkeys(bases)]
    assert on_device == sorted(on_device, reverse=True)  # resident bases first
    needed = chosen | {parents[e] for e in chosen if e in parents}
    assert batch_plan.loads == sum(state.tier(e) != "device" for e in needed)
    # executing it loads each of those at most once when the device holds every expert
    pool, mover = make_pool(device=100, host=100, sizes=state.sizes, parents=parents)
    for name, tier in residence.items():
        if tier == "device":
            pool.ensure(name)
    mover.moves.clear()
    with pool.announce(order):
        for group in batch_plan.groups:
            with pool.pinned([group.expert]):
                pass
    assert len(loads_of(mover)) == batch_plan.loads


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), expert_names), min_size=1, max_size=60), st.integers(3, 12), st.integers(0, 20))
def test_pool_invariants_under_any_sequence(ops, device, host):
    sizes = {f"e{i}": 1 + i % 3 for i in range(8)}
    parents = {"e5": "e0", "e6": "e0", "e7": "e1"}
    pool, mover = make_pool(device=device, host=max(host, 3), sizes=sizes, parents=parents, host_adapters=1)
    for announce, name in ops:
        if announce:
            pool.announce([name])
            continue
        try:
            with pool.pinned([name]):
                assert pool.tier(name) == "device"
        except PoolCapacityError:
            pass
        usage = pool.usage()
        assert all(u["resident"] <= u["budget"] and u["claimed"] == 0 for u in usage.values())
        for child, parent in parents.items():
            assert pool.tier(child) != "device" or pool.tier(parent) == "device"


def test_many_threads_random_mixes_respect_budget_and_pins():
    sizes = {f"m{i}": 2 + i % 3 for i in range(8)} | {f"l{i}": 1 for i in range(6)}
    parents = {f"l{i}": f"m{i % 2}" for i in range(6)}
    pool, mover = make_pool(device=12, host=14, sizes=sizes, parents=parents, delay=0.0005, host_adapters=3,
                            wait_timeout=20)
    errors: list[BaseException] = []
    prefetches = []
    over_budget = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for tier, u in pool.usage().items():
                if u["resident"] > u["budget"]:
                    over_budget.append((tier, u))
            time.sleep(0.0002)

    def worker(seed: int):
        rng = random.Random(seed)
        try:
            for _ in range(60):
                names = rng.sample(sorted(sizes), rng.randint(1, 2))
                if rng.random() < 0.3:
                    pool.announce(rng.sample(sorted(sizes), 3))
                if rng.random() < 0.4:
                    prefetches.append(pool.prefetch(rng.sample(sorted(sizes), 1)))
                try:
                    with pool.pinned(names):
                        assert all(pool.tier(n) == "device" and pool.pins(n) > 0 for n in names)
                        time.sleep(rng.random() * 0.001)
                except PoolCapacityError as exc:
                    if "waited" in str(exc):
                        raise
        except BaseException as exc:
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    watcher.join()
    pool.close()
    assert not any(t.is_alive() for t in threads), "deadlock: a worker never finished"
    errors += [f.exception() for f in prefetches if not isinstance(f.exception(), (PoolCapacityError, type(None)))]
    assert not errors, errors[0]
    assert not over_budget
    assert all(pool.pins(n) == 0 for n in sizes)
    assert pool.usage()["device"]["claimed"] == pool.usage()["host"]["claimed"] == 0
    assert pool.stats().loads == len(loads_of(mover)) > 20


def test_the_default_device_budget_on_a_cpu_leaves_room_for_what_already_runs(monkeypatch):
    """Half the RAM, but at most three quarters of what is available when the pool is made: a pool
    started beside a test session or other servers does not push the machine into Ray's OOM killer."""
    import collections

    import psutil

    from experts.pool import machine_budgets

    memory = collections.namedtuple("memory", "total available")
    gib = 2**30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(24 * gib, 20 * gib))
    assert machine_budgets().device == 12 * gib and machine_budgets().host == 6 * gib
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(24 * gib, 8 * gib))
    assert machine_budgets().device == 6 * gib and machine_budgets().host == 6 * gib
