"""Prometheus metrics of the ingress: requests, latency, routing decisions, experts, fallbacks,
queue depth, tokens (a Result is counted where it is rendered, deploy/openai_api.py `observe`),
the expert pools' residence, bytes per tier and moves (`PoolCollector`, refreshed at each scrape),
usage per key (`UsageCollector`, refreshed at each scrape) and the response cache
(`CacheCollector`). deploy/grafana/coe-dashboard.json charts them."""

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

KEY_REJECTIONS = Counter("coe_key_rejections", "Requests refused for their key: unknown key, model not allowed, "
                         "over a rate limit or budget", ["key", "code"], registry=REGISTRY)


class UsageCollector:
    """Usage per key and expert as the key store last reported it (deploy/keys.py KeyStore.usage):
    the store is shared by the ingress replicas, so the /metrics handler fetches it and `update`s
    this before rendering, as for the pools."""

    def __init__(self):
        self.usage: dict = {"data": []}

    def update(self, usage: dict) -> None:
        self.usage = usage

    def collect(self):
        requests = CounterMetricFamily("coe_key_requests", "Answers per key and expert", labels=["key", "expert"])
        tokens = CounterMetricFamily("coe_key_tokens", "Tokens per key and expert", labels=["key", "expert", "kind"])
        cost = CounterMetricFamily("coe_key_cost_dollars", "Spend per key and expert", labels=["key", "expert"])
        budget = GaugeMetricFamily("coe_key_budget_dollars", "Each key's budget and its spend in the current period",
                                   labels=["key", "period", "kind"])
        for entry in self.usage["data"]:
            for row in entry["experts"]:
                labels = [entry["key"], row["expert"]]
                requests.add_metric(labels, row["requests"])
                tokens.add_metric([*labels, "prompt"], row["prompt_tokens"])
                tokens.add_metric([*labels, "completion"], row["completion_tokens"])
                cost.add_metric(labels, row["cost"])
            if entry.get("budget"):
                period = entry["budget"]["period"]
                budget.add_metric([entry["key"], period, "budget"], entry["budget"]["dollars"])
                budget.add_metric([entry["key"], period, "spent"], entry["budget"]["spent"])
        return [requests, tokens, cost, budget]


class CacheCollector:
    """The response caches of this process (deploy/cache.py), read at each scrape."""

    def __init__(self):
        self.caches: list = []

    def track(self, cache) -> None:
        self.caches.append(cache)

    def collect(self):
        lookups = CounterMetricFamily("coe_cache_lookups", "Response cache lookups by result", labels=["result"])
        entries = GaugeMetricFamily("coe_cache_entries", "Entries in the response cache and its bound", labels=["kind"])
        removals = CounterMetricFamily("coe_cache_removals", "Entries removed: least recently used past the bound, "
                                       "or expired", labels=["reason"])
        rebuilds = CounterMetricFamily("coe_cache_rebuilds", "Cache files discarded (unreadable) and rebuilt")
        stats = [cache.stats() for cache in self.caches]
        if stats:
            for result, field in (("exact_hit", "exact_hits"), ("semantic_hit", "semantic_hits"), ("miss", "misses"),
                                  ("bypassed", "bypassed")):
                lookups.add_metric([result], sum(s[field] for s in stats))
            entries.add_metric(["entries"], sum(s["entries"] for s in stats))
            entries.add_metric(["max"], sum(s["max_entries"] for s in stats))
            removals.add_metric(["evicted"], sum(s["evictions"] for s in stats))
            removals.add_metric(["expired"], sum(s["expirations"] for s in stats))
            rebuilds.add_metric([], sum(s["rebuilds"] for s in stats))
        return [lookups, entries, removals, rebuilds]


USAGE = UsageCollector()
REGISTRY.register(USAGE)
CACHE = CacheCollector()
REGISTRY.register(CACHE)


def render() -> bytes:
    return generate_latest(REGISTRY)
