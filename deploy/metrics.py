"""Prometheus metrics of the ingress: requests, latency, routing decisions, experts, fallbacks,
queue depth, tokens (a Result is counted where it is rendered, deploy/openai_api.py `observe`),
and the expert pools' residence, bytes per tier and moves (`PoolCollector`, refreshed at each
scrape)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REGISTRY = CollectorRegistry()
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)

REQUESTS = Counter("coe_requests", "HTTP requests by endpoint, policy and status code",
                   ["endpoint", "policy", "status"], registry=REGISTRY)
LATENCY = Histogram("coe_request_latency_seconds", "End-to-end latency of chat completions per policy",
                    ["policy", "stream"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
FIRST_TOKEN = Histogram("coe_time_to_first_token_seconds", "Streamed chat completions: time to the first text",
                        ["policy"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
ROUTED = Counter("coe_routed", "Experts chosen by the router (routing decisions)", ["policy", "expert"], registry=REGISTRY)
ANSWERED = Counter("coe_answered", "Experts that answered, after any fallback", ["policy", "expert"], registry=REGISTRY)
EXPERT_LATENCY = Histogram("coe_expert_generate_seconds", "Generation time of the batch each answering expert ran in",
                           ["expert"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
LOAD = Histogram("coe_expert_load_seconds", "Time spent loading experts for a request", ["expert"],
                 buckets=LATENCY_BUCKETS, registry=REGISTRY)
INCIDENTS = Counter("coe_incidents", "Expert failures, timeouts, cooldowns, fallbacks and aggregator failures",
                    ["expert", "kind"], registry=REGISTRY)
FALLBACKS = Counter("coe_fallback_answers", "Answers that came from a fallback expert", ["policy"], registry=REGISTRY)
IN_FLIGHT = Gauge("coe_in_flight_requests", "Requests inside the ingress (queued or running) per endpoint",
                  ["endpoint"], registry=REGISTRY)
REJECTED = Counter("coe_rejected_overload", "Requests answered 503 because the queues were full", ["endpoint"],
                   registry=REGISTRY)
BATCH = Histogram("coe_router_batch_size", "Queries in the router batch each request ran in (queueing made visible)",
                  buckets=(1, 2, 4, 8, 16, 32, 64), registry=REGISTRY)
SHADOW = Counter("coe_shadow_decisions", "Decisions of each policy's shadow router, and whether they agreed with the serving one",
                 ["policy", "shadow", "agrees"], registry=REGISTRY)
TOKENS = Counter("coe_tokens", "Tokens processed", ["kind"], registry=REGISTRY)


class PoolCollector:
    """The expert pools as the last scrape found them (experts/backends/base.py `pool_report`):
    each pool's counters live in its own replica, so the /metrics handler fetches the reports and
    `update`s this before rendering. Series are labelled by `where` (family/replica), so each
    replica's counters stay monotonic when there are several."""

    def __init__(self):
        self.reports: list[dict] = []

    def update(self, reports: list[dict]) -> None:
        self.reports = reports

    def collect(self):
        resident = GaugeMetricFamily("coe_expert_resident", "1 for the tier each expert is in, per pool replica",
                                     labels=["where", "expert", "tier"])
        tier_bytes = GaugeMetricFamily("coe_pool_bytes", "Bytes resident in and budgeted for each tier",
                                       labels=["where", "tier", "kind"])
        loads = CounterMetricFamily("coe_pool_loads", "Expert arrivals on the device tier", labels=["where"])
        evictions = CounterMetricFamily("coe_pool_evictions", "Departures to a lower tier", labels=["where"])
        moves = CounterMetricFamily("coe_pool_moves", "Moves between tiers per edge", labels=["where", "edge"])
        moved = CounterMetricFamily("coe_pool_moved_bytes", "Bytes moved between tiers per edge", labels=["where", "edge"])
        seconds = CounterMetricFamily("coe_pool_move_seconds", "Seconds spent moving per edge", labels=["where", "edge"])
        stalls = CounterMetricFamily("coe_pool_stall_seconds", "Seconds requests waited for their experts to arrive",
                                     labels=["where"])
        for report in self.reports:
            where = report["where"]
            for expert, tier in report["residence"].items():
                resident.add_metric([where, expert, tier], 1)
            for tier, usage in report.get("usage", {}).items():
                tier_bytes.add_metric([where, tier, "resident"], usage["resident"])
                tier_bytes.add_metric([where, tier, "budget"], usage["budget"])
            stats = report.get("stats")
            if stats:
                loads.add_metric([where], stats["loads"])
                evictions.add_metric([where], stats["evictions"])
                stalls.add_metric([where], stats["stall_seconds"])
                for edge, count in stats["moves"].items():
                    moves.add_metric([where, edge], count)
                    moved.add_metric([where, edge], stats["bytes_moved"].get(edge, 0))
                    seconds.add_metric([where, edge], stats["seconds"].get(edge, 0.0))
        return [resident, tier_bytes, loads, evictions, moves, moved, seconds, stalls]


POOLS = PoolCollector()
REGISTRY.register(POOLS)
POOL_REPORT_ERRORS = Counter("coe_pool_report_errors", "Scrapes that could not fetch the pools' reports",
                             registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
