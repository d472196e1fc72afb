"""Prometheus metrics of the ingress: requests, latency, routing decisions, tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry()
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)

REQUESTS = Counter("coe_requests", "HTTP requests by endpoint, policy and status code",
                   ["endpoint", "policy", "status"], registry=REGISTRY)
LATENCY = Histogram("coe_request_latency_seconds", "End-to-end latency of chat completions",
                    ["policy"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
ROUTED = Counter("coe_routed", "Experts chosen by the router", ["policy", "expert"], registry=REGISTRY)
TOKENS = Counter("coe_tokens", "Tokens processed", ["kind"], registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
