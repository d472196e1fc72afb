"""The pool's pluggable eviction policy, experts without a host tier, and hot experts' full copies:
pure Python, milliseconds (no model is loaded)."""

from __future__ import annotations

import time

import pytest

from core.config import HotExpertsConfig, PoolConfig
from core.errors import UnknownNameError
from experts.pool import BeladyLRU, HotRule, TierBudgets, TieredPool
from tests.test_pool import make_pool


def wait_for(condition, seconds=5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


class MostRecentlyUsedFirst(BeladyLRU):
    """A different policy: ignores the plan, evicts the most recently used expert first."""

    def keep_order(self, implied):
        return lambda name: (self._last_used.get(name, 0),)


def test_the_eviction_policy_is_pluggable():
    sizes = {"a": 1, "b": 1, "c": 1, "d": 1}
    default, _ = make_pool(device=3, host=4, sizes=sizes)
    mru, _ = make_pool(device=3, host=4, sizes=sizes, policy=MostRecentlyUsedFirst())
    for pool in (default, mru):
        for name in "abcd":
            with pool.pinned([name]):
                pass
    assert default.tier("a") == "host" and mru.tier("c") == "host"  # LRU's victim vs MRU's
    assert isinstance(TieredPool.from_config(PoolConfig()).policy, BeladyLRU)
    with pytest.raises(UnknownNameError, match="eviction policy"):
        TieredPool.from_config(PoolConfig(eviction="random"))


def test_an_expert_without_a_host_tier_goes_disk_device_disk():
    pool, mover = make_pool(device=6, host=0, sizes={})
    pool.add("engine-a", 6, rests_on_host=False)
    pool.add("engine-b", 6, rests_on_host=False)
    with pool.pinned(["engine-a"]):  # no host budget at all: it never passes through host
        pass
    with pool.pinned(["engine-b"]):
        pass
    assert [m.edge for m in mover.moves] == ["disk->device", "device->disk", "disk->device"]
    pool.evict("engine-b", to="host")  # no host tier: dropped
    assert pool.residence() == {"engine-a": "disk", "engine-b": "disk"}
    assert pool.stats().bytes_loaded == 12 and pool.usage()["host"]["resident"] == 0


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_hot_rule_needs_share_count_and_rate():
    clock = Clock()
    rule = HotRule(HotExpertsConfig(share=0.5, cold_share=0.2, window=10, min_requests=4, min_rate=1.0), clock)
    for expert in ["a", "a", "a"]:
        rule.note(expert)
    assert rule.verdict("a", copy_on_device=False) is None  # 3 < min_requests
    rule.note("b")
    assert rule.share("a") == 0.75 and rule.verdict("a", False) == "promote" and rule.verdict("b", False) is None
    clock.now = 100.0  # four requests in 100 s: a trickle
    assert rule.rate() == pytest.approx(0.04) and rule.verdict("a", False) is None
    for _ in range(10):
        rule.note("b")  # the window slides: a's share falls to 0
    assert rule.verdict("a", copy_on_device=True) == "demote" and rule.verdict("b", copy_on_device=True) is None
    assert HotRule(HotExpertsConfig(enabled=False, min_requests=1)).verdict("a", False) is None


def copy_pool(device: int, hot: HotExpertsConfig | None = None):
    pool, mover = make_pool(device=device, host=0, sizes={}, hot=hot)
    pool.add("base", 10, rests_on_host=False)
    pool.add("lora", 1, parent="base", rests_on_host=False)
    pool.add_copy("lora@full", 10, "lora", rests_on_host=False)
    return pool, mover


def test_a_copy_on_the_device_serves_its_expert():
    pool, _ = copy_pool(device=25)
    with pool.pinned(["lora"]) as acquired:
        assert acquired.resolved == {"lora": "lora"} and pool.pins("base") == 1
    pool.ensure("lora@full")
    assert pool.state().tier("lora") == "device"  # the planner sees it ready
    pool.evict("base")
    assert pool.state().tier("lora") == "device" and pool.residence()["lora"] == "disk"
    with pool.pinned(["lora"]) as acquired:
        assert acquired.resolved == {"lora": "lora@full"} and pool.pins("lora@full") == 1 and pool.tier("base") == "disk"
    fast = pool.try_pin(["lora"])
    assert fast is not None and fast.resolved == {"lora": "lora@full"}
    fast.release()
    assert pool.try_pin(["base"]) is None  # would have to load: the caller pins (and waits) instead
    with pytest.raises(ValueError):
        pool.add_copy("lora@again", 10, "lora")


def test_belady_counts_an_announced_use_for_the_copy_too():
    pool, _ = copy_pool(device=21)
    pool.add("other", 10, rests_on_host=False)
    pool.ensure("lora@full")
    pool.ensure("other")
    with pool.announce(["lora", "base"]), pool.pinned(["base"]):  # lora comes next (its copy serves it); other never
        pass
    assert pool.tier("lora@full") == "device" and pool.tier("other") == "disk"


def test_hot_experts_are_promoted_into_free_memory_only_and_freed_when_cold():
    hot = HotExpertsConfig(share=0.5, cold_share=0.2, window=10, min_requests=4, min_rate=0.0, max_copies=1)
    pool, _ = copy_pool(device=21, hot=hot)
    pool.add("other", 10, rests_on_host=False)
    pool.ensure("lora")
    pool.ensure("other")  # 21 of 21 bytes held: no room for the copy
    for _ in range(6):
        pool.note_request("lora")
    report = pool.report()["hot"]
    assert report["pending"] == [] and report["copies"]["lora"] == {"copy": "lora@full", "tier": "disk", "bytes": 10, "share": 1.0}
    pool.evict("other")
    pool.note_request("lora")  # now it fits
    assert wait_for(lambda: pool.tier("lora@full") == "device")
    assert pool.stats().promotions == 1 and pool.tier("base") == "device"  # nothing was evicted for it
    with pool.pinned(["lora@full"]):
        for _ in range(10):
            pool.note_request("other")
        assert pool.report()["hot"]["pending"] == []  # in use: not freed now
    pool.note_request("other")
    assert wait_for(lambda: pool.tier("lora@full") == "disk") and pool.stats().demotions == 1


def test_a_copy_that_cannot_load_is_not_tried_again():
    class Failing:
        calls = 0

        def move(self, move):
            if move.expert == "lora@full":
                Failing.calls += 1
                raise RuntimeError("no merged weights")
            return 0.0

    pool = TieredPool(TierBudgets(device=30, host=0), Failing(),
                      hot=HotExpertsConfig(share=0.5, window=4, min_requests=2, min_rate=0.0))
    pool.add("base", 10, rests_on_host=False)
    pool.add("lora", 1, parent="base", rests_on_host=False)
    pool.add_copy("lora@full", 10, "lora", rests_on_host=False)
    for _ in range(3):
        pool.note_request("lora")
    assert wait_for(lambda: Failing.calls == 1 and pool.report()["hot"]["pending"] == [])
    for _ in range(5):
        pool.note_request("lora")
    assert pool.report()["hot"]["pending"] == [] and Failing.calls == 1 and pool.tier("lora@full") == "disk"
    with pool.pinned(["lora"]) as acquired:  # its own path still serves it
        assert acquired.resolved == {"lora": "lora"}


def test_a_prefetch_never_takes_the_place_of_an_expert_needed_first():
    from core.errors import PoolCapacityError

    pool, mover = make_pool(device=6, host=0, sizes={})
    pool.add("a", 6, rests_on_host=False)
    pool.add("b", 6, rests_on_host=False)
    pool.ensure("a")
    with pool.announce(["a", "b"]):  # the stage of a runs first, b's is prefetched meanwhile
        skipped = pool.prefetch(["b"])
        assert isinstance(skipped.exception(timeout=5), PoolCapacityError) and pool.tier("a") == "device"
        with pool.pinned(["a"]):
            pass
        assert pool.prefetch(["b"]).result(timeout=5) >= 0  # a's use has come: now b may take its place
    assert pool.tier("b") == "device" and [m.expert for m in mover.moves if m.target == "device"] == ["a", "b"]
    pool.close()
