"""The tiered expert memory pool: `device` / `host` / `disk`, byte budgets, plan-aware eviction.

Every expert has one location, its highest tier: `disk` (weight files; always there), `host`
(in RAM, e.g. a state dict; pinned memory on CUDA) or `device` (on the GPU; on a CPU machine,
instantiated and ready to run). Moves go disk -> host -> device and back down; an expert that
cannot rest on the host tier (`rests_on_host=False`: a vLLM engine on a CPU, which cannot sleep)
goes disk -> device and back to disk directly. A LoRA expert's parent (its base) must be on the
device whenever the adapter is, so evicting a base takes its adapters down with it. The pool
never lets a tier's resident bytes exceed its budget: it checks itself after every change
(`BudgetExceededError` would be a bug in the pool).

Eviction is plan-aware and pluggable: the planner announces the order in which a batch will use
its experts (`announce`), and the pool's `EvictionPolicy` ranks the resident experts by how much
they are worth keeping. The default, `BeladyLRU`, evicts the one whose next announced use is
farthest (Belady's rule); experts with no announced use go first, least recently used first
(LRU, for traffic nobody announced). Every pool (transformers, vLLM, replay) uses it unless
given another. Experts in use are pinned (`pinned`) and never evicted. Everything is
thread-safe: moves run outside the pool's lock, with their bytes claimed up front, so concurrent
requests and a prefetch thread can share one pool.

Hot experts: an expert may also have a full copy in the pool (`add_copy`): the expert as a full
model on an engine of its own, the engine's fast path (a LoRA expert's merged weights: its own
base with the adapter folded in; a base's own weights on an engine without LoRA). Each request
is counted (`note_request`); the `HotRule` promotes the copy to the device when the expert's
share of recent requests is high and the copy fits in the device memory left free, and frees it
when the share falls. While the copy is on the device, pinning the expert pins the copy instead
(`Acquired.resolved` says which), so its requests run there; the copy's memory is the pool's like
any expert's (`report`: share, tier and bytes of each copy).

The pool does no I/O itself and has no torch: a `Mover` supplied by the backend moves the weights
(the HF backend instantiates and frees models and keeps LoRA state dicts in RAM; the vLLM
backend starts and stops engines, or sleeps and wakes them on a GPU, and adds and removes
adapters). `SimulatedMover` moves nothing and accounts seconds from bytes and tier bandwidths,
to cost a workload on hardware we do not have.

Usage::

    from experts.pool import SimulatedMover, TierBudgets, TieredPool
    from orchestrator import planner

    pool = TieredPool(TierBudgets(device=80 * 10**9, host=1000 * 10**9), SimulatedMover())
    pool.add("llama-8b", size_bytes=16 * 10**9)                          # starts on disk
    pool.add("llama-8b-math", size_bytes=200 * 10**6, parent="llama-8b")   # a LoRA adapter on it

    batch_plan = planner.plan(decisions, pool.state())   # groups: each expert loads once per batch
    with pool.announce(batch_plan.order):                # eviction now knows what comes next
        stages = batch_plan.stages()                     # groups sharing a base run together
        for i, stage in enumerate(stages):
            if i + 1 < len(stages):                      # load the next stage in the background
                pool.prefetch([g.expert for g in stages[i + 1]])
            with pool.pinned([g.expert for g in stage]) as acquired:  # on the device, pinned
                ...                                      # compute; acquired.waited: seconds stalled
    pool.stats()   # PoolStats: loads, evictions, bytes and seconds per tier move, per expert

`TieredPool.from_config(PoolConfig, mover)` builds one with the configured budgets (defaults
derived from the machine's memory), eviction policy and hot-expert rule, and
`add_catalog(catalog, size_of)` registers a catalog.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, Field

from core.config import HotExpertsConfig
from core.errors import PoolCapacityError, UnknownNameError, unknown
from core.types import PoolState

if TYPE_CHECKING:
    from core.catalog import Catalog, ExpertSpec
    from core.config import PoolConfig

Tier = Literal["device", "host", "disk"]
TIERS: tuple[Tier, ...] = ("device", "host", "disk")
LEVEL = {"disk": 0, "host": 1, "device": 2}
GB = 10**9
FALLBACK_GBPS = 1.0  # a move's bandwidth before any was measured, for a mover that does not say
logger = logging.getLogger("coe.pool")


class BudgetExceededError(AssertionError):
    """A tier holds more bytes than its budget: a bug in the pool, never a user error."""


class TierBudgets(BaseModel):
    """Bytes each tier may hold; disk is unbounded (the weight files are always there)."""

    device: int = Field(ge=0)
    host: int = Field(ge=0)


def machine_budgets(device_fraction: float = 0.5, host_fraction: float = 0.25, free_fraction: float = 0.75) -> TierBudgets:
    """Defaults from this machine's memory (psutil). On a CPU machine `device` is RAM too (the
    instantiated models): `device_fraction` of it, but no more than `free_fraction` of what is
    available when the pool is made, so a pool started beside other work (a test session, other
    servers) leaves their memory alone; Ray's memory monitor kills workers past 95% of RAM. A GPU
    backend passes its own device budget (free GPU memory)."""
    import psutil

    memory = psutil.virtual_memory()
    device = min(memory.total * device_fraction, memory.available * free_fraction)
    return TierBudgets(device=int(device), host=int(memory.total * host_fraction))


@dataclass(frozen=True)
class Move:
    """One transfer the pool asks its mover to do."""

    expert: str
    size_bytes: int
    source: Tier
    target: Tier
    parent: str | None = None  # a LoRA adapter's base (already on the device when target is device)
    copy_of: str | None = None  # a full copy: the expert it serves

    @property
    def edge(self) -> str:
        return f"{self.source}->{self.target}"


class Mover(Protocol):
    """Moves an expert's weights between tiers. Moves the pool asks for: disk->host, host->device
    (load), device->host (offload: a vLLM engine's sleep(level=1)), host->disk and device->disk
    (free: the files on disk are never written), and for an expert that cannot rest on the host
    tier disk->device (load straight from the files: a vLLM engine start on a CPU). Returns the
    seconds to account, or None to let the pool measure the wall time of the call."""

    def move(self, move: Move) -> float | None: ...


class NullMover:
    """Moves nothing and takes no time: the pool's bookkeeping alone (unit tests)."""

    def move(self, move: Move) -> float | None:
        return 0.0


@dataclass
class SimulatedMover:
    """Accounts the seconds a move would take from its bytes and the tier bandwidths, moving
    nothing. Defaults are an H100 host: PCIe Gen5 x16 (~50 GB/s achieved) between host and
    device, one NVMe drive (~7 GB/s) from disk; freeing memory costs nothing. `time_scale` > 0
    also sleeps that fraction of the simulated time, so overlap (prefetch) shows on the wall clock."""

    host_to_device_gbps: float = 50.0
    device_to_host_gbps: float = 50.0
    disk_to_host_gbps: float = 7.0
    time_scale: float = 0.0

    def seconds(self, move: Move) -> float:
        if move.edge == "disk->device":  # through host memory without staying there
            return move.size_bytes / (self.disk_to_host_gbps * GB) + move.size_bytes / (self.host_to_device_gbps * GB)
        rate = {"host->device": self.host_to_device_gbps, "device->host": self.device_to_host_gbps,
                "disk->host": self.disk_to_host_gbps}.get(move.edge)
        return move.size_bytes / (rate * GB) if rate else 0.0

    def move(self, move: Move) -> float:
        seconds = self.seconds(move)
        if self.time_scale > 0:
            time.sleep(seconds * self.time_scale)
        return seconds


# -- eviction ----------------------------------------------------------------------------------


class EvictionPolicy(Protocol):
    """Which resident experts are most worth keeping. The pool tells the policy what the plan
    announces and what is used, and asks it for a ranking whenever it must make room; the policy
    never moves anything. Every method is called under the pool's lock: it must not call back
    into the pool."""

    def announce(self, ticket: int, names: list[str]) -> None:
        """Upcoming uses, in order (one announcement, withdrawn by its ticket)."""

    def withdraw(self, ticket: int) -> None:
        """The uses of an announcement not consumed yet are off."""

    def used(self, names: Iterable[str], consume: Iterable[str] = ()) -> None:
        """`names` are in use now; each of `consume` was an announced use that has come."""

    def keep_order(self, implied: Callable[[str], Iterable[str]]) -> Callable[[str], tuple]:
        """A sort key over expert names, most worth keeping first. `implied(name)`: the experts
        a use of `name` keeps in use as well (its base, its full copy)."""


class BeladyLRU:
    """Belady's rule over the announced uses, LRU for the rest: the expert whose next announced
    use is farthest is evicted first; experts with no announced use go before any announced
    one, least recently used first (traffic nobody announced: a server's single requests)."""

    def __init__(self):
        self._plan: list[tuple[int, str]] = []  # announced future uses: (ticket, expert), in order
        self._last_used: dict[str, int] = {}
        self._clock = itertools.count(1)

    def announce(self, ticket: int, names: list[str]) -> None:
        self._plan.extend((ticket, name) for name in names)

    def withdraw(self, ticket: int) -> None:
        self._plan = [entry for entry in self._plan if entry[0] != ticket]

    def used(self, names: Iterable[str], consume: Iterable[str] = ()) -> None:
        tick = next(self._clock)
        for name in names:
            self._last_used[name] = tick
        for name in consume:
            for i, (_, planned) in enumerate(self._plan):
                if planned == name:
                    del self._plan[i]
                    break

    def next_uses(self, implied: Callable[[str], Iterable[str]]) -> dict[str, int]:
        """Position of each expert's next announced use."""
        nxt: dict[str, int] = {}
        for position, (_, name) in enumerate(self._plan):
            for kept in implied(name):
                nxt.setdefault(kept, position)
        return nxt

    def keep_order(self, implied: Callable[[str], Iterable[str]]) -> Callable[[str], tuple]:
        nxt = self.next_uses(implied)
        return lambda name: (nxt.get(name, math.inf), -self._last_used.get(name, 0))


EVICTION_POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"belady": BeladyLRU}


def eviction_policy(name: str) -> EvictionPolicy:
    if name not in EVICTION_POLICIES:
        raise unknown("eviction policy", name, list(EVICTION_POLICIES))
    return EVICTION_POLICIES[name]()


# -- hot experts -------------------------------------------------------------------------------


class HotRule:
    """Which experts deserve their full copy on the device, from recent requests
    (HotExpertsConfig): promote at `share` of the last `window` requests once `min_requests` are
    counted and they come at `min_rate` per second or more; demote below `cold_share` (the gap
    keeps a copy from flapping). `clock`: seconds, monotonic (tests pass their own)."""

    def __init__(self, config: HotExpertsConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._recent: deque[tuple[float, str]] = deque(maxlen=config.window)
        self._counts: Counter[str] = Counter()

    def note(self, expert: str) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._counts[self._recent[0][1]] -= 1
        self._recent.append((self.clock(), expert))
        self._counts[expert] += 1

    def share(self, expert: str) -> float:
        return self._counts[expert] / len(self._recent) if self._recent else 0.0

    def rate(self) -> float:
        """Requests per second over the window (its oldest request to now)."""
        if not self._recent:
            return 0.0
        return len(self._recent) / max(self.clock() - self._recent[0][0], 1e-3)

    def verdict(self, expert: str, copy_on_device: bool) -> Literal["promote", "demote"] | None:
        if not self.config.enabled or len(self._recent) < self.config.min_requests:
            return None
        share = self.share(expert)
        if not copy_on_device and share >= self.config.share and self.rate() >= self.config.min_rate:
            return "promote"

        if copy_on_device and share < self.config.cold_share:
            return "demote"
        return None


# -- accounting --------------------------------------------------------------------------------


class ExpertStats(BaseModel):
    loads: int = 0  # arrivals on the device
    evictions: int = 0  # departures to a lower tier
    bytes_moved: int = 0
    load_seconds: float = 0.0  # disk->host and host->device seconds


class PoolStats(BaseModel):
    """Counters since the pool was made (or `reset_stats`): what deploy/metrics exports."""

    loads: int = 0  # arrivals on the device
    evictions: int = 0  # departures from device or host to a lower tier
    moves: dict[str, int] = Field(default_factory=dict)  # per edge, e.g. "disk->host"
    bytes_moved: dict[str, int] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict)
    load_seconds: float = 0.0  # disk->host + host->device (+ disk->device)
    stall_seconds: float = 0.0  # wall seconds callers of pinned() waited for their experts
    promotions: int = 0  # full copies of hot experts brought to the device
    demotions: int = 0  # full copies freed because their expert went cold
    per_expert: dict[str, ExpertStats] = Field(default_factory=dict)

    @property
    def bytes_loaded(self) -> int:
        return sum(self.bytes_moved.get(edge, 0) for edge in ("disk->host", "host->device", "disk->device"))


@dataclass
class Acquired:
    """What `pin` did: wall seconds waited, and seconds of moves it did itself (not counting moves
    another thread, e.g. the prefetcher, did for it); `resolved` maps each expert asked for to
    the one pinned for it (itself, or its full copy); `release` unpins (once)."""

    waited: float = 0.0
    moved: float = 0.0
    release: Callable[[], None] = field(default=lambda: None, repr=False)
    resolved: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        release, done = self.release, []

        def once() -> None:
            if not done:
                done.append(True)
                release()

        self.release = once


@dataclass
class _Item:
    name: str
    size: int
    parent: str | None
    kind: str  # "base", "adapter" (has a parent) or "copy" (an expert's full copy)
    rests_on_host: bool = True  # False: it goes disk <-> device directly (a CPU vLLM engine)
    copy_of: str | None = None  # a full copy: the expert it serves
    copy: str | None = None  # an expert: its full copy, if it has one
    tier: Tier = "disk"
    pins: int = 0
    moving: bool = False
    children: list[str] = field(default_factory=list)


class Announcement:
    """An announced use order; leaving the `with` block withdraws the uses not yet consumed."""

    def __init__(self, pool: TieredPool, ticket: int):
        self._pool, self._ticket = pool, ticket

    def withdraw(self) -> None:
        self._pool._withdraw(self._ticket)

    def __enter__(self) -> Announcement:
        return self

    def __exit__(self, *exc) -> None:
        self.withdraw()


class TieredPool:
    def __init__(self, budgets: TierBudgets, mover: Mover | None = None, *, host_adapters: int | None = None,
                 wait_timeout: float = 60.0, policy: EvictionPolicy | None = None, hot: HotExpertsConfig | None = None):
        """`policy`: the eviction policy (BeladyLRU when None). `hot`: the rule for full copies of
        hot experts (`add_copy`); None: copies are never promoted on their own."""
        self.budgets = budgets
        self.mover: Mover = mover or NullMover()
        self.host_adapters = host_adapters  # most LoRA adapters cached in host memory; None: bytes only
        self.wait_timeout = wait_timeout
        self.policy: EvictionPolicy = policy or BeladyLRU()
        self.hot = HotRule(hot or HotExpertsConfig(enabled=False))
        self._items: dict[str, _Item] = {}
        self._resident = {"device": 0, "host": 0}  # bytes occupying each tier now (a move counts in both)
        self._claimed = {"device": 0, "host": 0}  # bytes promised to moves that have not arrived yet
        self._cond = threading.Condition(threading.RLock())
        self._tickets = itertools.count(1)
        self._stats = PoolStats()
        self._prefetcher: ThreadPoolExecutor | None = None
        self._promoter: ThreadPoolExecutor | None = None  # promotions and demotions of full copies
        self._changing: set[str] = set()  # full copies a promotion or demotion is on its way for
        self._unloadable: set[str] = set()  # full copies whose promotion failed: not tried again

    @classmethod
    def from_config(cls, config: PoolConfig, mover: Mover | None = None, device_bytes: int | None = None) -> TieredPool:
        """Budgets from config; what it leaves unset comes from the machine (`device_bytes`, when the
        backend knows its device memory, e.g. a GPU's, else `machine_budgets`)."""
        machine = machine_budgets()
        budgets = TierBudgets(device=config.device_bytes or device_bytes or machine.device,
                              host=config.host_bytes or machine.host)
        return cls(budgets, mover, host_adapters=config.host_adapters, wait_timeout=config.wait_timeout_s,
                   policy=eviction_policy(config.eviction), hot=config.hot)

    # -- registration and inspection ---------------------------------------------------------

    def add(self, name: str, size_bytes: int, parent: str | None = None, *, rests_on_host: bool = True) -> None:
        """Register an expert, on disk. A LoRA adapter names its base as `parent` (added first).
        `rests_on_host=False`: the expert has no host tier (it goes disk <-> device directly)."""
        self._register(_Item(name, int(size_bytes), parent, "adapter" if parent else "base", rests_on_host))

    def add_copy(self, name: str, size_bytes: int, expert: str, *, rests_on_host: bool = True) -> None:
        """Register `name`, a full copy of `expert` (added first): a full model of its own in the
        budgets, promoted and demoted by the hot rule, or moved like any expert."""
        with self._cond:
            served = self._get(expert)
            if served.kind == "copy" or served.copy is not None:
                raise ValueError(f"{expert!r} is a copy or has one already")
            self._register(_Item(name, int(size_bytes), None, "copy", rests_on_host, copy_of=expert))
            served.copy = name

    def _register(self, item: _Item) -> None:
        with self._cond:
            if item.name in self._items:
                raise ValueError(f"expert {item.name!r} is already in the pool")
            if item.parent is not None and item.parent not in self._items:
                raise ValueError(f"parent {item.parent!r} of {item.name!r} is not in the pool; add it first")
            self._items[item.name] = item
            if item.parent is not None:
                self._items[item.parent].children.append(item.name)

    def add_catalog(self, catalog: Catalog, size_of: Callable[[ExpertSpec], int] | None = None,
                    rests_on_host: Callable[[ExpertSpec], bool] | None = None) -> None:
        """Register every expert of a catalog (bases first); sizes from `size_of` or the catalog;
        `rests_on_host(spec)` says which have a host tier (all, when None)."""
        for spec in sorted(catalog.experts, key=lambda e: e.kind != "base"):
            if spec.name not in self._items:
                self.add(spec.name, size_of(spec) if size_of else spec.size_bytes,
                         parent=spec.base if spec.kind == "lora" else None,
                         rests_on_host=rests_on_host(spec) if rests_on_host else True)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def tier(self, name: str) -> Tier:
        return self._get(name).tier

    def residence(self) -> dict[str, Tier]:
        """Where each expert is, full copies included (under their own names)."""
        with self._cond:
            return {n: i.tier for n, i in self._items.items()}

    def full_copy(self, expert: str) -> str | None:
        return self._get(expert).copy

    def state(self) -> PoolState:
        """What the planner needs: where each expert is, its size and its parent. An expert whose
        full copy is on the device counts as on the device: its requests run there."""
        with self._cond:
            residence = {n: i.tier for n, i in self._items.items()}
            for item in self._items.values():
                if item.copy is not None and self._items[item.copy].tier == "device":
                    residence[item.name] = "device"
            return PoolState(residence=residence, sizes={n: i.size for n, i in self._items.items()},
                             parents={n: i.parent for n, i in self._items.items() if i.parent})

    def usage(self) -> dict[str, dict[str, int]]:
        """Bytes resident now and the budget, per bounded tier."""
        with self._cond:
            return {t: {"resident": self._resident[t], "claimed": self._claimed[t],
                        "budget": getattr(self.budgets, t)} for t in ("device", "host")}

    def fits(self, name: str) -> bool:
        """Whether the expert (with its base) fits in the device budget at all."""
        with self._cond:
            return sum(self._items[n].size for n in self._closure([name])) <= self.budgets.device

    def seconds_to_device(self, names: Iterable[str]) -> dict[str, float]:
        """Seconds each expert (with its base) would take to reach the device from where it is now,
        at the bandwidths measured on this pool's moves (before any: the mover's own, else
        `FALLBACK_GBPS`): what a load costs, for routing that weighs it (a resident expert, or one
        whose full copy is on the device: 0). An expert with no host tier (a CPU vLLM engine) loads
        straight from disk, at the measured disk->device rate once there is one."""
        with self._cond:
            rates = {}
            for edge in ("disk->host", "host->device", "disk->device"):
                moved, seconds = self._stats.bytes_moved.get(edge, 0), self._stats.seconds.get(edge, 0.0)
                if moved and seconds > 0:
                    rates[edge] = moved / seconds
                elif edge != "disk->device":
                    nominal = getattr(self.mover, edge.replace("->", "_to_") + "_gbps", FALLBACK_GBPS)
                    rates[edge] = nominal * GB
            out = {}
            for name in names:
                total = 0.0
                for item in (self._items[n] for n in self._closure([self._resolve(name)])):
                    if item.tier == "disk" and not item.rests_on_host and "disk->device" in rates:
                        total += item.size / rates["disk->device"]
                        continue
                    if item.tier == "disk":
                        total += item.size / rates["disk->host"]
                    if item.tier != "device":
                        total += item.size / rates["host->device"]
                out[name] = total
            return out

    def pins(self, name: str) -> int:
        return self._get(name).pins

    def stats(self) -> PoolStats:
        with self._cond:
            return self._stats.model_copy(deep=True)

    def reset_stats(self) -> None:
        with self._cond:
            self._stats = PoolStats()

    def report(self) -> dict:
        """Plain data for /v1/pool and /metrics: bytes per tier, counters, and the hot-expert
        rule with each full copy (the expert's share of recent requests, the copy's tier and
        its memory cost)."""
        with self._cond:
            copies = {i.copy_of: {"copy": i.name, "tier": i.tier, "bytes": i.size, "share": round(self.hot.share(i.copy_of), 3)}
                      for i in self._items.values() if i.kind == "copy"}
            report = {"usage": self.usage(), "stats": self.stats().model_dump()}
            if copies:
                report["hot"] = {"rule": self.hot.config.model_dump(), "rate": round(self.hot.rate(), 2),
                                 "copies": copies, "pending": sorted(self._changing)}

            return report

    # -- the plan ------------------------------------------------------------------------------

    def announce(self, order: Iterable[str]) -> Announcement:
        """Announce upcoming uses in order; each `pinned` use consumes the first matching entry."""
        ticket = next(self._tickets)
        with self._cond:
            self.policy.announce(ticket, [name for name in order if name in self._items])
        return Announcement(self, ticket)

    def _withdraw(self, ticket: int) -> None:
        with self._cond:
            self.policy.withdraw(ticket)

    def _implied(self, name: str) -> list[str]:
        """The experts a use of `name` keeps in use: itself, its base, its full copy."""
        item = self._items[name]
        return [n for n in (name, item.parent, item.copy) if n is not None]

    def _keep_order(self) -> Callable[[_Item], tuple]:
        """Sort key over items, most worth keeping first (the eviction policy's ranking)."""
        keep = self.policy.keep_order(self._implied)
        return lambda item: keep(item.name)

    # -- use -------------------------------------------------------------------------------------

    def pin(self, names: Iterable[str], consume: bool = True) -> Acquired:
        """Bring the experts (and their bases) to the device and pin them until `release` is
        called on what this returns. An expert whose full copy is on the device is served by
        the copy: the copy is pinned instead (`Acquired.resolved`). Raises PoolCapacityError
        when they cannot fit in the device budget, or when other pins keep them out for longer
        than `wait_timeout`. Pin everything a step needs in one call: a thread that holds pins
        and asks for more experts that need room can wait on itself (nesting is fine for experts
        already pinned, as a backend does inside the engine's pins). `consume=False`: the use
        was not announced (a backend's own per-request pin), so no announced use is consumed."""
        started = time.perf_counter()
        names = list(names)
        moved, needed, resolved = self._acquire(names, pin=True, consume=names if consume else ())
        acquired = Acquired(waited=time.perf_counter() - started, moved=moved,
                            release=lambda: self._release(needed), resolved=resolved)
        with self._cond:
            self._stats.stall_seconds += acquired.waited
        return acquired

    def try_pin(self, names: Iterable[str]) -> Acquired | None:
        """`pin(names, consume=False)` when everything is on the device already, without waiting
        or moving anything (an event loop's fast path); None when something would have to move."""
        names = list(names)
        with self._cond:
            resolved = {n: self._resolve(n) for n in names}
            needed = self._closure(resolved.values())
            items = [self._items[n] for n in needed]
            if any(i.tier != "device" or i.moving for i in items):
                return None
            for item in items:
                item.pins += 1
            self.policy.used(needed)
        return Acquired(release=lambda: self._release(needed), resolved=resolved)

    @contextmanager
    def pinned(self, names: Iterable[str]) -> Iterator[Acquired]:
        """`pin` for the block."""
        acquired = self.pin(names)
        try:
            yield acquired
        finally:
            acquired.release()

    def ensure(self, name: str) -> float:
        """Bring one expert to the device without pinning it; returns the seconds of moves done."""
        return self._acquire([name], pin=False)[0]

    def prefetch(self, names: Iterable[str]) -> Future:
        """Load experts to the device on a background thread; the future gives the seconds moved.
        A prefetch only evicts experts the policy ranks below the ones it brings (under Belady:
        needed later, or not at all), and never waits: when the room is not there now (it would
        take the place of an expert the plan uses first, e.g. the resident base of the stage
        about to run, or pinned experts hold it), it gives up (PoolCapacityError in the future)
        and the stage's own `pin` loads its experts when their turn comes."""
        names = list(names)
        with self._cond:
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-prefetch")
        if not names:
            done: Future = Future()
            done.set_result(0.0)
            return done
        return self._prefetcher.submit(lambda: self._acquire(names, pin=False, prefetch=True)[0])

    def evict(self, name: str, to: Tier = "disk") -> float:
        """Move an expert (and, from the device, its adapters) down to `to`, if not pinned (an
        expert that cannot rest on the host goes to disk). Returns the seconds of moves done."""
        with self._cond:
            item = self._get(name)
            while item.moving:
                self._cond.wait()
            if LEVEL[item.tier] <= LEVEL[to]:
                return 0.0
            unit = [self._items[c] for c in item.children if self._items[c].tier == "device"] + [item] \
                if item.tier == "device" else [item]
            if any(u.pins or u.moving for u in unit) or any(self._items[c].moving for c in item.children):
                raise PoolCapacityError(f"expert {name!r} is in use and cannot be evicted")
            moves = []
            for u in unit:
                target: Tier = to if u is item else "host" if to == "host" else "disk"
                moves += self._plan_down(u, target)
        return self._execute(moves)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        if self._promoter is not None:  # promotions not started yet are dropped
            self._promoter.shutdown(wait=True, cancel_futures=True)

    # -- hot experts -----------------------------------------------------------------------------

    def note_request(self, expert: str) -> None:
        """Count one request for `expert` (a backend calls this per request it serves) and let
        the hot rule act: full copies are promoted or freed in the background; the requests
        that come once a copy is on the device are served by it."""
        with self._cond:
            if expert not in self._items:
                return
            self.hot.note(expert)
            if not self.hot.config.enabled:
                return
            changes = self._hot_changes()
            if changes and self._promoter is None:
                self._promoter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-hot")
            self._changing.update(name for name, _ in changes)
        for name, change in changes:
            self._promoter.submit(self._change_copy, name, change)

    def _hot_changes(self) -> list[tuple[str, str]]:
        """Under the lock: (full copy, "promote" or "demote") the rule asks for now."""
        copies = [i for i in self._items.values() if i.kind == "copy"]
        held = sum(1 for i in copies if i.tier == "device" or i.name in self._changing)
        free = self.budgets.device - self._resident["device"] - self._claimed["device"]
        changes = []
        for copy in copies:
            if copy.name in self._changing or copy.name in self._unloadable or copy.moving:
                continue
            verdict = self.hot.verdict(copy.copy_of, copy.tier == "device")
            if verdict == "promote" and held < self.hot.config.max_copies and copy.size <= free:
                changes.append((copy.name, verdict))
                held += 1
                free -= copy.size
            elif verdict == "demote" and not copy.pins:
                changes.append((copy.name, verdict))
        return changes

    def _change_copy(self, name: str, change: str) -> None:
        try:
            if change == "promote":
                self._acquire([name], pin=False, may_evict=False)
            else:
                self.evict(name, "disk")
        except PoolCapacityError:  # no room after all, or in use: the rule asks again on a later request
            return
        except Exception:
            logger.exception("full copy %s failed to load; its expert keeps its own path", name)
            with self._cond:
                self._unloadable.add(name)
            return
        finally:
            with self._cond:
                self._changing.discard(name)
        with self._cond:
            if change == "promote":
                self._stats.promotions += 1
            else:
                self._stats.demotions += 1

    # -- internals -------------------------------------------------------------------------------

    def _get(self, name: str) -> _Item:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"expert {name!r} is not in the pool", "add it first") from None

    def _resolve(self, name: str) -> str:
        """Under the lock: what serves `name` now: its full copy when that is on the device."""
        item = self._get(name)
        if item.copy is not None:
            copy = self._items[item.copy]
            if copy.tier == "device" and not copy.moving:
                return copy.name
        return name

    def _closure(self, names: Iterable[str]) -> list[str]:
        """The experts plus their bases, bases first."""
        out: list[str] = []
        for name in names:
            chain = []
            item = self._get(name)
            while item is not None:
                chain.append(item.name)
                item = self._items[item.parent] if item.parent else None
            out += [n for n in reversed(chain) if n not in out]
        return out

    def _acquire(self, names: list[str], pin: bool, consume: Iterable[str] = (),
                 may_evict: bool = True, prefetch: bool = False) -> tuple[float, list[str], dict[str, str]]:
        """Bring `names` (resolved to full copies where those are on the device) and their
        bases to the device; returns (seconds of moves, the experts pinned, the resolution)."""
        deadline = time.monotonic() + self.wait_timeout
        with self._cond:
            while True:
                resolved = {n: self._resolve(n) for n in names}
                needed = self._closure(resolved.values())
                items = [self._items[n] for n in needed]
                if not any(i.moving for i in items):
                    moves = self._plan_up(items, may_evict, prefetch)
                    if moves is not None:
                        break
                elif not prefetch:
                    # Another caller is moving them (an engine start may take minutes on a busy CPU):
                    # that is progress, not memory held by pins, so the wait_timeout starts after it.
                    self._cond.wait()
                    deadline = time.monotonic() + self.wait_timeout
                    continue
                if prefetch:
                    raise PoolCapacityError(f"prefetch of {needed} skipped: no room it may take now")

                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolCapacityError(
                        f"experts {needed} waited {self.wait_timeout:.0f}s for device memory held by pinned experts",
                        "raise pool.device_bytes or run fewer experts at once")
                self._cond.wait(timeout=remaining)
            # Pinned while their moves run even without `pin` (a prefetch): a base already on the
            # device must not be evicted while its adapter is on its way up.
            for item in items:
                item.pins += 1
            self.policy.used(needed, consume if pin else ())
        try:
            seconds = self._execute(moves)
        except BaseException:
            self._release(needed)
            raise
        if not pin:
            self._release(needed)
        return seconds, needed, resolved

    def _release(self, needed: list[str]) -> None:
        with self._cond:
            for name in needed:
                self._items[name].pins -= 1
            self.policy.used(needed)
            self._cond.notify_all()

    def _plan_up(self, items: list[_Item], may_evict: bool = True,
                 prefetch: bool = False) -> list[tuple[_Item, Tier, Tier]] | None:
        """Under the lock: the moves that bring `items` to the device, with their bytes claimed,
        or None when they must wait for other experts to be unpinned or to finish moving.
        `may_evict=False`: raise PoolCapacityError rather than evict anything (a promotion).
        `prefetch`: evict only experts ranked below every one of `items` (else wait)."""
        missing = [i for i in items if i.tier != "device"]
        if not missing:
            return []
        needed = {i.name for i in items}
        device_need = sum(i.size for i in missing)
        if device_need > self.budgets.device - sum(i.size for i in items if i.tier == "device"):
            raise PoolCapacityError(
                f"experts {sorted(needed)} need {device_need / GB:.2f} GB more on the device, budget "
                f"{self.budgets.device / GB:.2f} GB", "raise pool.device_bytes or run fewer experts at once")
        # Host bytes the experts on their way up need at the worst moment (bases first; an expert
        # on disk passes through host unless it loads straight to the device, one already on host
        # frees its bytes once on the device).
        level = peak = 0
        for item in missing:
            if item.tier == "disk" and item.rests_on_host:
                level += item.size
                peak = max(peak, level)
            if item.tier == "host" or item.rests_on_host:
                level -= item.size
        if peak > self.budgets.host:
            raise PoolCapacityError(f"experts {sorted(needed)} need {peak / GB:.2f} GB of host memory on their "
                                    f"way to the device, budget {self.budgets.host / GB:.2f} GB", "raise pool.host_bytes")
        keep = self._keep_order()

        # Device: evict the experts least worth keeping until the missing ones fit; a base takes
        # the adapters sitting on it along.
        free = self.budgets.device - self._resident["device"] - self._claimed["device"]
        victims: list[_Item] = []
        if free < device_need:
            if not may_evict:
                raise PoolCapacityError(f"experts {sorted(needed)} do not fit in the free device memory")

            # A prefetch must not evict what the plan needs before what it brings.
            floor = max(keep(i) for i in missing) if prefetch else None

            def evictable(item: _Item) -> bool:
                return (item.tier == "device" and item.name not in needed and not item.pins and not item.moving
                        and (floor is None or keep(item) > floor))


            candidates = [i for i in self._items.values() if evictable(i) and all(
                evictable(self._items[c]) for c in i.children if self._items[c].tier == "device")]
            for item in sorted(candidates, key=keep, reverse=True):
                if free >= device_need:
                    break
                if item in victims:
                    continue
                unit = [item] + [self._items[c] for c in item.children
                                 if self._items[c].tier == "device" and self._items[c] not in victims]
                victims += unit
                free += sum(x.size for x in unit)
            if free < device_need:
                return None

        # Host: keep the most useful of (idle host experts + device victims) that fit beside what
        # must stay and the experts in transit; the rest go to disk (a drop: files are never written).
        idle = [i for i in self._items.values() if i.tier == "host" and not i.moving and i.name not in needed]
        fixed_bytes = self._resident["host"] - sum(i.size for i in idle)
        room = self.budgets.host - self._claimed["host"] - fixed_bytes - peak
        if room < 0:
            return None  # host memory is held by experts in transit for other requests
        adapters_left = math.inf if self.host_adapters is None else self.host_adapters - sum(
            1 for i in self._items.values() if i.tier == "host" and i.kind == "adapter" and i not in idle and i not in missing)
        kept: set[str] = set()
        for item in sorted(idle + victims, key=keep):
            if item.rests_on_host and item.size <= room and (item.kind != "adapter" or adapters_left >= 1):
                kept.add(item.name)
                room -= item.size
                adapters_left -= item.kind == "adapter"

        moves: list[tuple[_Item, Tier, Tier]] = [(i, "host", "disk") for i in idle if i.name not in kept]
        for item in sorted(victims, key=lambda i: i.kind != "adapter"):  # adapters leave before their base
            moves.append((item, "device", "host" if item.name in kept else "disk"))
        for item in missing:  # bases first (`items` is in closure order)
            if item.tier == "disk" and not item.rests_on_host:
                moves.append((item, "disk", "device"))
                continue
            if item.tier == "disk":
                moves.append((item, "disk", "host"))
            moves.append((item, "host", "device"))
        self._claim(moves)
        return moves

    def _plan_down(self, item: _Item, target: Tier) -> list[tuple[_Item, Tier, Tier]]:
        if target == "host" and not item.rests_on_host:
            target = "disk"
        if target == "host" and item.tier == "device":
            adapters_on_host = sum(1 for i in self._items.values() if i.tier == "host" and i.kind == "adapter")
            full = self.budgets.host - self._resident["host"] - self._claimed["host"] < item.size
            if full or (item.kind == "adapter" and self.host_adapters is not None and adapters_on_host >= self.host_adapters):
                target = "disk"
        moves = [(item, item.tier, target)]
        self._claim(moves)
        return moves

    def _claim(self, moves: list[tuple[_Item, Tier, Tier]]) -> None:
        for item, _, target in moves:
            item.moving = True
            if target != "disk":
                self._claimed[target] += item.size

    def _execute(self, moves: list[tuple[_Item, Tier, Tier]]) -> float:
        """Outside the lock: run the mover for each move, in order, updating the accounting."""
        total = 0.0
        remaining = list(moves)
        try:
            while remaining:
                item, source, target = remaining[0]
                with self._cond:
                    if target != "disk":
                        self._claimed[target] -= item.size
                        self._resident[target] += item.size
                        self._check_budgets()
                move = Move(item.name, item.size, source, target, item.parent, item.copy_of)
                started = time.perf_counter()
                reported = self.mover.move(move)
                seconds = time.perf_counter() - started if reported is None else float(reported)
                total += seconds
                with self._cond:
                    remaining.pop(0)
                    if source != "disk":
                        self._resident[source] -= item.size
                    item.tier = target
                    if not any(m[0] is item for m in remaining):
                        item.moving = False
                    self._count(move, seconds)
                    self._cond.notify_all()
        except BaseException:
            with self._cond:
                item, source, target = remaining[0]
                if target != "disk":  # the failed move: back where it was
                    self._resident[target] -= item.size
                for other, _, later in remaining[1:]:
                    if later != "disk":
                        self._claimed[later] -= other.size
                for other, _, _ in remaining:
                    other.moving = False
                self._cond.notify_all()
            raise
        return total

    def _count(self, move: Move, seconds: float) -> None:
        s = self._stats
        s.moves[move.edge] = s.moves.get(move.edge, 0) + 1
        s.bytes_moved[move.edge] = s.bytes_moved.get(move.edge, 0) + move.size_bytes
        s.seconds[move.edge] = s.seconds.get(move.edge, 0.0) + seconds
        per = s.per_expert.setdefault(move.expert, ExpertStats())
        per.bytes_moved += move.size_bytes
        if LEVEL[move.target] > LEVEL[move.source]:
            s.load_seconds += seconds
            per.load_seconds += seconds
            if move.target == "device":
                s.loads += 1
                per.loads += 1
        else:
            s.evictions += 1
            per.evictions += 1

    def _check_budgets(self) -> None:
        for tier in ("device", "host"):
            if self._resident[tier] > getattr(self.budgets, tier):
                raise BudgetExceededError(f"{tier} holds {self._resident[tier]} bytes, budget {getattr(self.budgets, tier)}")
