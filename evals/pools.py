"""What the pools of a running coe server did during a measured load, from its pool report
(GET /v1/pool): the moves they finished (loads onto the device, evictions), the full copies still
on their way, and what each replica holds. A benchmark that measures while a pool starts an engine
on the same cores says so with these."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


def pool_reports(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/pool", timeout=60).json()["data"]


def moves(reports: list[dict]) -> int:
    """Moves every pool replica has finished: loads onto the device and evictions from it."""
    return sum(r.get("stats", {}).get("loads", 0) + r.get("stats", {}).get("evictions", 0) for r in reports)


def pending(reports: list[dict]) -> list[str]:
    """Full copies on their way up or down, over every replica."""
    return sorted(name for r in reports for name in (r.get("hot") or {}).get("pending", []))


def summary(report: dict) -> dict:
    """What one pool replica holds: engines and adapters on the device, its hot rule's full copies
    (the copy's name, as on_device lists it -> its tier) and moves."""
    stats = report.get("stats", {})
    return {"where": report["where"], "on_device": sorted(n for n, t in report["residence"].items() if t == "device"),
            "usage": report.get("usage"),
            "copies": {copy["copy"]: copy["tier"] for copy in ((report.get("hot") or {}).get("copies") or {}).values()},
            "promotions": stats.get("promotions"), "demotions": stats.get("demotions"), "loads": stats.get("loads")}


def while_measured(before: list[dict], after: list[dict]) -> dict:
    """The pools' part of a measured load: `pool_moves_while_measured` (0 and nothing pending after:
    the pools stayed put), `pending_after`, and each replica's summary at the end."""
    return {"pool_moves_while_measured": moves(after) - moves(before), "pending_after": pending(after),
            "pools": [summary(r) for r in after]}


def steady(measured: dict) -> bool:
    return measured["pool_moves_while_measured"] == 0 and not measured["pending_after"]


def wait_until_settled(reports: Callable[[], list[dict]], timeout_s: float) -> float:
    """Seconds until no pool replica has a full copy on its way up or down (`reports`: the pool
    reports now, e.g. `lambda: pool_reports(url)`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not pending(reports()):
            return round(time.monotonic() - started, 1)
        time.sleep(2)
    raise SystemExit(f"the pools still had promotions pending after {timeout_s:.0f} s")


def settle(warm_up: Callable[[int], object], reports: Callable[[], list[dict]], window: int, engines_warmup: int,
           timeout_s: float) -> dict:
    """The steady state a serving benchmark measures in: `window` requests (`warm_up(n)` sends n,
    not counted; at least the hot rule's window, so the shares it sees are this traffic's), a wait
    until no full copy is on its way (`wait_until_settled`), then `engines_warmup` requests for the
    promoted engines' first shapes. Returns the seconds waited and the reports to compare the
    measured part against (`stayed_put`)."""
    warm_up(window)
    settle_s = wait_until_settled(reports, timeout_s)
    warm_up(engines_warmup)
    return {"settle_s": settle_s, "before": reports()}


def stayed_put(settled: dict, reports: Callable[[], list[dict]]) -> dict:
    """After the measured part: the seconds `settle` waited and what the pools did meanwhile."""
    return {"settle_s": settled["settle_s"], **while_measured(settled["before"], reports())}
