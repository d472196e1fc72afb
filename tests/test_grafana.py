"""The Grafana dashboard (deploy/grafana/coe-dashboard.json) charts what the app exports: every
metric and label it queries is on a rendered /metrics page of deploy/metrics.py, and every metric
the app exports is on the dashboard."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.config import CacheConfig
from deploy.cache import ResponseCache
from deploy.keys import KeySpec, KeyStore, key_hash

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "coe-dashboard.json"


def fresh_metrics():
    """A second copy of deploy/metrics.py with its own registry: filled here without touching the
    counters other tests read."""
    spec = importlib.util.spec_from_file_location("metrics_for_dashboard", ROOT / "deploy" / "metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample name -> its label names, on a /metrics page with one of everything."""
    from core.types import Decision, ExpertAnswer, ExpertScore, Incident, Result, Shadow, Usage
    from deploy import openai_api

    metrics = fresh_metrics()
    decision = Decision(query_id="q", policy="knn", ranked=[ExpertScore(expert="smollm2-math", score=0.9),
                                                            ExpertScore(expert="smollm2-135m", score=0.5)],
                        shadow=Shadow(policy="coe", chosen=["smollm2-135m"], agrees=False))
    result = Result(query_id="q", text="4", decision=decision, answers=[ExpertAnswer(expert="smollm2-135m", text="4")],
                    usage=Usage(prompt_tokens=3, completion_tokens=4), timings={"generate": 0.2, "load": 0.1},
                    incidents=[Incident(expert="smollm2-math", kind="timeout")], batch_size=2)
    serving, openai_api.metrics = openai_api.metrics, metrics  # observe() counts into the fresh copy
    try:
        openai_api.observe(result, 0.5, stream=False)
    finally:
        openai_api.metrics = serving
    metrics.FIRST_TOKEN.labels("knn").observe(0.1)
    metrics.IN_FLIGHT.labels("completions").inc()
    metrics.REJECTED.labels("completions").inc()
    metrics.POOL_REPORT_ERRORS.inc()
    metrics.KEY_REJECTIONS.labels("alice", "rate_limit_exceeded").inc()
    edge = "host->device"
    metrics.POOLS.update([{"where": "smollm2/abc", "backend": "hf", "residence": {"smollm2-math": "device"},
                           "usage": {"device": {"resident": 1, "budget": 2}},
                           "stats": {"loads": 1, "evictions": 0, "stall_seconds": 0.1, "moves": {edge: 1},
                                     "bytes_moved": {edge: 10}, "seconds": {edge: 0.1}}}])
    store = KeyStore([KeySpec(name="alice", key_sha256=key_hash("sk-alice-0123456789"), budget={"dollars": 1.0})])
    store.record("alice", "smollm2-math", 3, 4, 0.01)
    metrics.USAGE.update(store.usage())
    metrics.CACHE.track(ResponseCache(CacheConfig(enabled=True)))
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def queries() -> list[tuple[str, str, str]]:
    """(panel title, PromQL, legend format) of every target, rows included."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    flat = [p for panel in panels for p in [panel, *panel.get("panels", [])]]
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in flat for t in p.get("targets", [])]


def test_the_dashboard_is_grafana_json_with_a_prometheus_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30
    [variable] = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and len(queries()) >= 30
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]


def test_every_queried_metric_and_label_is_exported(exported):
    for title, expr, legend in queries():
        names = set(re.findall(r"\bcoe_[a-z0-9_]+\b", expr))
        assert names, f"{title}: no coe metric in {expr}"
        missing = names - set(exported)
        assert not missing, f"{title}: {sorted(missing)} are not on /metrics"
        labels = set().union(*(exported[n] for n in names))
        used = {label.strip() for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
                for label in group.split(",") if label.strip()}
        used |= {m for group in re.findall(r"\{([^}]*)\}", expr) for m in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", group)}
        used |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert used <= labels, f"{title}: labels {sorted(used - labels)} are not on {sorted(names)}"


def test_every_exported_metric_is_on_the_dashboard(exported):
    charted = {name for _, expr, _ in queries() for name in re.findall(r"\bcoe_[a-z0-9_]+\b", expr)}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in exported}
    uncharted = {f for f in families if not any(c == f or c.startswith(f + "_") for c in charted)}
    assert not uncharted, f"metrics the dashboard does not show: {sorted(uncharted)}"
