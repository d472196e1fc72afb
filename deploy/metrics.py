"""Prometheus metrics of the ingress: requests, latency, routing decisions, experts, fallbacks,
queue depth, tokens. Everything a response says about its routing is counted here."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
TOKENS = Counter("coe_tokens", "Tokens processed", ["kind"], registry=REGISTRY)


def observe_result(details: dict, seconds: float, stream: bool) -> None:
    """Count one answered chat completion from its description (Pipeline.describe)."""
    policy = details["policy"]
    REQUESTS.labels("chat", policy, "200").inc()
    LATENCY.labels(policy, str(stream).lower()).observe(seconds)
    for expert in details["experts"]:
        if expert["chosen"]:
            ROUTED.labels(policy, expert["name"]).inc()
    for expert in details["answered_by"]:
        ANSWERED.labels(policy, expert).inc()
        EXPERT_LATENCY.labels(expert).observe(details["timings"].get("generate", 0.0))
        LOAD.labels(expert).observe(details["timings"].get("load", 0.0))
    for incident in details["incidents"]:
        INCIDENTS.labels(incident["expert"], incident["kind"]).inc()
    if "batch" in details:
        BATCH.observe(details["batch"])
    if details["fallback"]:
        FALLBACKS.labels(policy).inc()
    TOKENS.labels("prompt").inc(details["usage"]["prompt_tokens"])
    TOKENS.labels("completion").inc(details["usage"]["completion_tokens"])


def render() -> bytes:
    return generate_latest(REGISTRY)
