"""evals/pools.py: the steady state serving benchmarks measure in, over plain pool reports."""

from evals import pools


def report(loads: int, pending: list[str]) -> dict:
    return {"where": "replica-1", "residence": {"smollm2-135m": "device"}, "stats": {"loads": loads, "evictions": 0},
            "hot": {"pending": pending, "copies": {}}}


def test_settle_waits_for_the_promotions_then_warms_the_new_engines_before_measuring(monkeypatch):
    monkeypatch.setattr(pools.time, "sleep", lambda seconds: None)
    states = [[report(1, ["smollm2-math@full"])], [report(1, ["smollm2-math@full"])], [report(2, [])]]

    events: list = []

    def reports() -> list[dict]:  # the pool's reports in turn, then the last one for good
        events.append("report")
        return states.pop(0) if len(states) > 1 else states[0]

    settled = pools.settle(events.append, reports, window=200, engines_warmup=16, timeout_s=60)
    # the hot rule's window, the wait until nothing is pending, the promoted engine's warm-up, the reports to compare against
    assert events == [200, "report", "report", "report", 16, "report"]
    assert settled["before"] == [report(2, [])] and states == [[report(2, [])]]
    state = pools.stayed_put(settled, lambda: [report(4, [])])  # two moves finished while measured
    assert state["pool_moves_while_measured"] == 2 and state["pending_after"] == [] and not pools.steady(state)
    assert pools.steady(pools.stayed_put(settled, lambda: [report(2, [])]))
