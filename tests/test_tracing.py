"""OpenTelemetry spans (core/tracing.py) with the SDK's in-memory exporter: steps nest from the
ingress through the router and, across a thread as across a process, to the pool and the backend;
nothing happens when tracing is not configured or OpenTelemetry is not installed."""

import asyncio
import sys
import threading

import pytest

from core import tracing
from core.config import CoeConfig, TracingConfig

pytest.importorskip("opentelemetry.sdk", reason="the `tracing` extra is not installed")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

SETTINGS = TracingConfig(endpoint="http://127.0.0.1:4318/v1/traces", service_name="coe-test")


@pytest.fixture
def exported():
    exporter = InMemorySpanExporter()
    assert tracing.configure(SETTINGS, exporter=exporter)
    yield exporter
    tracing.shutdown()


def by_name(exporter) -> dict:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_spans_nest_from_ingress_to_backend_across_a_process_boundary(exported):
    def pool_replica(request_carrier: dict) -> None:  # another thread: no context but the carrier
        with tracing.span("pool", carrier=request_carrier, expert="smollm2-math"), tracing.span("backend", backend="hf", batch=2):
            pass

    with tracing.span("ingress", model="coe", stream=False), \
            tracing.span("router", policy="knn", chosen=["smollm2-math"], unused=None):
        handed = tracing.carrier()
        replica = threading.Thread(target=pool_replica, args=(handed,))
        replica.start()
        replica.join()
    spans = by_name(exported)
    assert set(spans) == {"ingress", "router", "pool", "backend"}
    assert len({s.context.trace_id for s in spans.values()}) == 1
    assert spans["ingress"].parent is None
    for child, parent in (("router", "ingress"), ("pool", "router"), ("backend", "pool")):
        assert spans[child].parent.span_id == spans[parent].context.span_id, child
    assert spans["router"].attributes["policy"] == "knn" and list(spans["router"].attributes["chosen"]) == ["smollm2-math"]
    assert "unused" not in spans["router"].attributes and spans["backend"].attributes["batch"] == 2
    assert spans["ingress"].resource.attributes["service.name"] == "coe-test"
    assert handed["traceparent"].split("-")[1] == format(spans["ingress"].context.trace_id, "032x")


def test_a_failing_step_marks_its_span_and_async_steps_nest(exported):
    @tracing.traced("router")
    async def route():
        await asyncio.sleep(0)
        with tracing.span("pool"):
            raise RuntimeError("expert failed")

    async def ingress():
        with tracing.span("ingress"):
            try:
                await route()
            except RuntimeError:
                pass

    asyncio.run(ingress())
    spans = by_name(exported)
    assert spans["pool"].status.status_code == StatusCode.ERROR
    assert spans["pool"].events[0].name == "exception"
    assert spans["pool"].parent.span_id == spans["router"].context.span_id
    assert spans["router"].parent.span_id == spans["ingress"].context.span_id


def test_no_spans_and_no_errors_when_not_configured():
    assert CoeConfig().serve.tracing is None
    assert not tracing.configure(None)
    with tracing.span("ingress", model="coe") as current:
        assert current is None
        assert tracing.carrier() == {}
    assert tracing.traced()(lambda x: x + 1)(1) == 2


def test_a_missing_opentelemetry_leaves_tracing_off(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the extra were not installed
    assert not tracing.configure(SETTINGS)
    assert "not installed" in caplog.text and not tracing.enabled()
    with tracing.span("ingress") as current:
        assert current is None


def test_spans_reach_an_otlp_collector_over_http():
    """A local stand-in for a collector: an HTTP server that takes OTLP/protobuf exports."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((self.path, self.headers.get("x-token"), ExportTraceServiceRequest.FromString(body)))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    try:
        assert tracing.configure(TracingConfig(endpoint=endpoint, headers={"x-token": "collector-secret"}))
        with tracing.span("ingress"), tracing.span("router", policy="knn"):
            pass
        tracing.flush()
    finally:
        tracing.shutdown()
        server.shutdown()
    names = {span.name for _, _, request in received for resource in request.resource_spans
             for scope in resource.scope_spans for span in scope.spans}
    assert names == {"ingress", "router"}
    assert {(path, token) for path, token, _ in received} == {("/v1/traces", "collector-secret")}


def test_a_chat_request_is_one_trace_from_the_ingress_to_its_experts(exported):
    from fastapi.testclient import TestClient

    from core.catalog import load_catalog
    from deploy.server import LocalPipelineClient, build_api
    from orchestrator.pipeline import Pipeline
    from tests.fakes import ScriptedBackend, ScriptedRouter

    experts = ["smollm2-math", "smollm2-science"]
    pipeline = Pipeline(load_catalog(), ScriptedBackend(), {"scripted": ScriptedRouter({"q": (experts, 2, "vote")})}, "scripted")
    client = TestClient(build_api(LocalPipelineClient(pipeline)))
    assert client.post("/v1/chat/completions", json={"model": "coe", "messages": [{"role": "user", "content": "q"}]}).status_code == 200
    pipeline.close()
    spans = exported.get_finished_spans()
    ingress = next(s for s in spans if s.name == "ingress")
    steps = [s for s in spans if s.name in ("route", "expert")]
    assert sorted(s.name for s in steps) == ["expert", "expert", "route"]
    assert sorted(s.attributes["expert"] for s in steps if s.name == "expert") == experts
    assert all(s.context.trace_id == ingress.context.trace_id and s.parent.span_id == ingress.context.span_id for s in steps)
