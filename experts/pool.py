"""The tiered expert memory pool: `device` / `host` / `disk`, byte budgets, plan-aware eviction.

Every expert has one location, its highest tier: `disk` (weight files; always there), `host`
(in RAM, e.g. a state dict; pinned memory on CUDA) or `device` (on the GPU; on a CPU machine,
instantiated and ready to run). Moves go disk -> host -> device and back down; a LoRA expert's
parent (its base) must be on the device whenever the adapter is, so evicting a base takes its
adapters down with it. The pool never lets a tier's resident bytes exceed its budget: it checks
itself after every change (`BudgetExceededError` would be a bug in the pool).

Eviction is plan-aware: the planner announces the order in which a batch will use its experts
(`announce`), and the pool evicts the resident expert whose next announced use is farthest
(Belady's rule); experts with no announced use go first, least recently used first (LRU).
Experts in use are pinned (`pinned`) and never evicted. Everything is thread-safe: moves run
outside the pool's lock, with their bytes claimed up front, so concurrent requests and a
prefetch thread can share one pool.

The pool does no I/O itself and has no torch: a `Mover` supplied by the backend moves the weights
(the HF backend instantiates and frees models and keeps LoRA state dicts in RAM; a vLLM engine's
`sleep(level=1)` / `wake_up()` is a whole base's device <-> host move). `SimulatedMover` moves
nothing and accounts seconds from bytes and tier bandwidths, to cost a workload on hardware we
do not have.

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
derived from the machine's memory) and `add_catalog(catalog, size_of)` registers a catalog.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, Field

from core.errors import PoolCapacityError, UnknownNameError
from core.types import PoolState

if TYPE_CHECKING:
    from core.catalog import Catalog, ExpertSpec
    from core.config import PoolConfig

Tier = Literal["device", "host", "disk"]
TIERS: tuple[Tier, ...] = ("device", "host", "disk")
LEVEL = {"disk": 0, "host": 1, "device": 2}
GB = 10**9
FALLBACK_GBPS = 1.0  # a move's bandwidth before any was measured, for a mover that does not say


class BudgetExceededError(AssertionError):
    """A tier holds more bytes than its budget: a bug in the pool, never a user error."""


class TierBudgets(BaseModel):
    """Bytes each tier may hold; disk is unbounded (the weight files are always there)."""

    device: int = Field(ge=0)
    host: int = Field(ge=0)


def machine_budgets(device_fraction: float = 0.5, host_fraction: float = 0.25) -> TierBudgets:
    """Defaults from this machine's memory (psutil). On a CPU machine `device` is RAM too (the
    instantiated models); a GPU backend passes its own device budget (free GPU memory)."""
    import psutil

    total = psutil.virtual_memory().total
    return TierBudgets(device=int(total * device_fraction), host=int(total * host_fraction))


@dataclass(frozen=True)
class Move:
    """One transfer the pool asks its mover to do."""

    expert: str
    size_bytes: int
    source: Tier
    target: Tier
    parent: str | None = None  # a LoRA adapter's base (already on the device when target is device)

    @property
    def edge(self) -> str:
        return f"{self.source}->{self.target}"


class Mover(Protocol):
    """Moves an expert's weights between tiers. Moves the pool asks for: disk->host, host->device
    (load), device->host (offload: a vLLM engine's sleep(level=1)), host->disk and device->disk
    (free: the files on disk are never written). Returns the seconds to account, or None to let
    the pool measure the wall time of the call."""

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
        rate = {"host->device": self.host_to_device_gbps, "device->host": self.device_to_host_gbps,
                "disk->host": self.disk_to_host_gbps}.get(move.edge)
        return move.size_bytes / (rate * GB) if rate else 0.0

    def move(self, move: Move) -> float:
        seconds = self.seconds(move)
        if self.time_scale > 0:
            time.sleep(seconds * self.time_scale)
        return seconds


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
    load_seconds: float = 0.0  # disk->host + host->device
    stall_seconds: float = 0.0  # wall seconds callers of pinned() waited for their experts
    per_expert: dict[str, ExpertStats] = Field(default_factory=dict)

    @property
    def bytes_loaded(self) -> int:
        return self.bytes_moved.get("disk->host", 0) + self.bytes_moved.get("host->device", 0)


@dataclass
class Acquired:
    """What `pin` did: wall seconds waited, and seconds of moves it did itself (not counting moves
    another thread, e.g. the prefetcher, did for it); `release` unpins (once)."""

    waited: float = 0.0
    moved: float = 0.0
    release: Callable[[], None] = field(default=lambda: None, repr=False)

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
    kind: str  # "base" or "adapter" (has a parent)
    tier: Tier = "disk"
    pins: int = 0
    moving: bool = False
    last_used: int = 0
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
                 wait_timeout: float = 60.0):
        self.budgets = budgets
        self.mover: Mover = mover or NullMover()
        self.host_adapters = host_adapters  # most LoRA adapters cached in host memory; None: bytes only
        self.wait_timeout = wait_timeout
        self._items: dict[str, _Item] = {}
        self._resident = {"device": 0, "host": 0}  # bytes occupying each tier now (a move counts in both)
        self._claimed = {"device": 0, "host": 0}  # bytes promised to moves that have not arrived yet
        self._cond = threading.Condition(threading.RLock())
        self._clock = itertools.count(1)
        self._tickets = itertools.count(1)
        self._plan: list[tuple[int, str]] = []  # announced future uses: (ticket, expert), in order
        self._stats = PoolStats()
        self._prefetcher: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, config: PoolConfig, mover: Mover | None = None, device_bytes: int | None = None) -> TieredPool:
        """Budgets from config; what it leaves unset comes from the machine (`device_bytes`, when the
        backend knows its device memory, e.g. a GPU's, else `machine_budgets`)."""
        machine = machine_budgets()
        budgets = TierBudgets(device=config.device_bytes or device_bytes or machine.device,
                              host=config.host_bytes or machine.host)
        return cls(budgets, mover, host_adapters=config.host_adapters, wait_timeout=config.wait_timeout_s)

    # -- registration and inspection ---------------------------------------------------------

    def add(self, name: str, size_bytes: int, parent: str | None = None) -> None:
        """Register an expert, on disk. A LoRA adapter names its base as `parent` (added first)."""
        with self._cond:
            if name in self._items:
                raise ValueError(f"expert {name!r} is already in the pool")
            if parent is not None and parent not in self._items:
                raise ValueError(f"parent {parent!r} of {name!r} is not in the pool; add it first")
            self._items[name] = _Item(name, int(size_bytes), parent, "adapter" if parent else "base")
            if parent is not None:
                self._items[parent].children.append(name)

    def add_catalog(self, catalog: Catalog, size_of: Callable[[ExpertSpec], int] | None = None) -> None:
        """Register every expert of a catalog (bases first); sizes from `size_of` or the catalog."""
        for spec in sorted(catalog.experts, key=lambda e: e.kind != "base"):
            if spec.name not in self._items:
                self.add(spec.name, size_of(spec) if size_of else spec.size_bytes,
                         parent=spec.base if spec.kind == "lora" else None)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def tier(self, name: str) -> Tier:
        return self._get(name).tier

    def residence(self) -> dict[str, Tier]:
        with self._cond:
            return {n: i.tier for n, i in self._items.items()}

    def state(self) -> PoolState:
        """What the planner needs: where each expert is, its size and its parent."""
        with self._cond:
            return PoolState(residence={n: i.tier for n, i in self._items.items()},
                             sizes={n: i.size for n, i in self._items.items()},
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
        `FALLBACK_GBPS`): what a load costs, for routing that weighs it (a resident expert: 0)."""
        with self._cond:
            rates = {}
            for edge in ("disk->host", "host->device"):
                moved, seconds = self._stats.bytes_moved.get(edge, 0), self._stats.seconds.get(edge, 0.0)
                nominal = getattr(self.mover, {"disk->host": "disk_to_host_gbps", "host->device": "host_to_device_gbps"}[edge],
                                  FALLBACK_GBPS)
                rates[edge] = moved / seconds if moved and seconds > 0 else nominal * GB
            out = {}
            for name in names:
                total = 0.0
                for item in (self._items[n] for n in self._closure([name]) if n in self._items):
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

    # -- the plan ------------------------------------------------------------------------------

    def announce(self, order: Iterable[str]) -> Announcement:
        """Announce upcoming uses in order; each `pinned` use consumes the first matching entry."""
        ticket = next(self._tickets)
        with self._cond:
            self._plan.extend((ticket, name) for name in order if name in self._items)
        return Announcement(self, ticket)

    def _withdraw(self, ticket: int) -> None:
        with self._cond:
            self._plan = [entry for entry in self._plan if entry[0] != ticket]

    def _consume(self, names: Iterable[str]) -> None:
        for name in names:
            for i, (_, planned) in enumerate(self._plan):
                if planned == name:
                    del self._plan[i]
                    break

    def _next_uses(self) -> dict[str, int]:
        """Position of each expert's next announced use; a base is next used with any adapter."""
        nxt: dict[str, int] = {}
        for position, (_, name) in enumerate(self._plan):
            nxt.setdefault(name, position)
            parent = self._items[name].parent
            if parent is not None:
                nxt.setdefault(parent, position)
        return nxt

    def _keep_order(self, nxt: dict[str, int]) -> Callable[[_Item], tuple]:
        """Sort key, most worth keeping first: soonest announced use, then most recently used."""
        return lambda item: (nxt.get(item.name, math.inf), -item.last_used)

    # -- use -------------------------------------------------------------------------------------

    def pin(self, names: Iterable[str]) -> Acquired:
        """Bring the experts (and their bases) to the device and pin them until `release` is
        called on what this returns. Raises PoolCapacityError when they cannot fit in the device
        budget, or when other pins keep them out for longer than `wait_timeout`. Pin everything a
        step needs in one call: a thread that holds pins and asks for more experts that need room
        can wait on itself (nesting is fine for experts already pinned, as the HF backend does
        inside the engine's pins)."""
        started = time.perf_counter()
        names = list(names)
        needed = self._closure(names)
        moved = self._acquire(needed, pin=True, consume=names)
        acquired = Acquired(waited=time.perf_counter() - started, moved=moved,
                            release=lambda: self._release(needed))
        with self._cond:
            self._stats.stall_seconds += acquired.waited
        return acquired

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
        return self._acquire(self._closure([name]), pin=False)

    def prefetch(self, names: Iterable[str]) -> Future:
        """Load experts to the device on a background thread; the future gives the seconds moved."""
        names = list(names)
        with self._cond:
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-prefetch")
        if not names:
            done: Future = Future()
            done.set_result(0.0)
            return done
        return self._prefetcher.submit(lambda: self._acquire(self._closure(names), pin=False))

    def evict(self, name: str, to: Tier = "disk") -> None:
        """Move an expert (and, from the device, its adapters) down to `to`, if not pinned."""
        with self._cond:
            item = self._get(name)
            while item.moving:
                self._cond.wait()
            if LEVEL[item.tier] <= LEVEL[to]:
                return
            unit = [self._items[c] for c in item.children if self._items[c].tier == "device"] + [item] \
                if item.tier == "device" else [item]
            if any(u.pins or u.moving for u in unit) or any(self._items[c].moving for c in item.children):
                raise PoolCapacityError(f"expert {name!r} is in use and cannot be evicted")
            moves = []
            for u in unit:
                target: Tier = to if u is item else "host" if to == "host" else "disk"
                moves += self._plan_down(u, target)
        self._execute(moves)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)

    # -- internals -------------------------------------------------------------------------------

    def _get(self, name: str) -> _Item:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"expert {name!r} is not in the pool", "add it first") from None

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

    def _acquire(self, needed: list[str], pin: bool, consume: Iterable[str] = ()) -> float:
        deadline = time.monotonic() + self.wait_timeout
        with self._cond:
            while True:
                items = [self._items[n] for n in needed]
                if not any(i.moving for i in items):
                    moves = self._plan_up(items)
                    if moves is not None:
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolCapacityError(
                        f"experts {needed} waited {self.wait_timeout:.0f}s for device memory held by pinned experts",
                        "raise pool.device_bytes or run fewer experts at once")
                self._cond.wait(timeout=remaining)
            # Pinned while their moves run even without `pin` (a prefetch): a base already on the
            # device must not be evicted while its adapter is on its way up.
            tick = next(self._clock)
            for item in items:
                item.last_used = tick
                item.pins += 1
            if pin:
                self._consume(consume)
        try:
            seconds = self._execute(moves)
        except BaseException:
            self._release(needed)
            raise
        if not pin:
            self._release(needed)
        return seconds

    def _release(self, needed: list[str]) -> None:
        with self._cond:
            tick = next(self._clock)
            for name in needed:
                item = self._items[name]
                item.pins -= 1
                item.last_used = tick
            self._cond.notify_all()

    def _plan_up(self, items: list[_Item]) -> list[tuple[_Item, Tier, Tier]] | None:
        """Under the lock: the moves that bring `items` to the device, with their bytes claimed,
        or None when they must wait for other experts to be unpinned or to finish moving."""
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
        # on disk passes through host, one already on host frees its bytes once on the device).
        level = peak = 0
        for item in missing:
            if item.tier == "disk":
                level += item.size
                peak = max(peak, level)
            level -= item.size
        if peak > self.budgets.host:
            raise PoolCapacityError(f"experts {sorted(needed)} need {peak / GB:.2f} GB of host memory on their "
                                    f"way to the device, budget {self.budgets.host / GB:.2f} GB", "raise pool.host_bytes")
        keep = self._keep_order(self._next_uses())

        # Device: evict the experts least worth keeping until the missing ones fit; a base takes
        # the adapters sitting on it along.
        free = self.budgets.device - self._resident["device"] - self._claimed["device"]
        victims: list[_Item] = []
        if free < device_need:
            def evictable(item: _Item) -> bool:
                return item.tier == "device" and item.name not in needed and not item.pins and not item.moving

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
            if item.size <= room and (item.kind != "adapter" or adapters_left >= 1):
                kept.add(item.name)
                room -= item.size
                adapters_left -= item.kind == "adapter"

        moves: list[tuple[_Item, Tier, Tier]] = [(i, "host", "disk") for i in idle if i.name not in kept]
        for item in sorted(victims, key=lambda i: i.kind != "adapter"):  # adapters leave before their base
            moves.append((item, "device", "host" if item.name in kept else "disk"))
        for item in missing:  # bases first (`items` is in closure order)
            if item.tier == "disk":
                moves.append((item, "disk", "host"))
            moves.append((item, "host", "device"))
        self._claim(moves)
        return moves

    def _plan_down(self, item: _Item, target: Tier) -> list[tuple[_Item, Tier, Tier]]:
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
                move = Move(item.name, item.size, source, target, item.parent)
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
