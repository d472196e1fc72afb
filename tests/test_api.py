"""The HTTP API in-process (deploy/server.py over a real Pipeline with an in-memory backend and
router): the OpenAI wire format, streaming, errors for every kind of bad input, and a schemathesis
fuzz of the app's own OpenAPI schema. No torch and no Ray: seconds. tests/test_serve.py drives
the same API on a real Serve app with real models."""

import json

import openai
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import settings

from core.catalog import load_catalog
from core.config import FaultConfig, ResilienceConfig
from deploy.server import ApiSettings, LocalPipelineClient, build_api
from orchestrator.faults import FaultyBackend
from orchestrator.pipeline import Pipeline
from tests.fakes import KeywordRouter, ScriptedBackend

KEY = "secret-key"


def make_pipeline(backend=None, resilience=None) -> Pipeline:
    return Pipeline(load_catalog(), backend or ScriptedBackend(), {"keyword": KeywordRouter()}, "keyword", resilience)


@pytest.fixture(scope="module")
def http():
    return TestClient(build_api(LocalPipelineClient(make_pipeline()), ApiSettings(api_keys=[KEY])),
                      headers={"authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def ask(content="What is 2 + 2 in math?", **extra):
    return {"model": "coe", "messages": [{"role": "user", "content": content}], **extra}


def test_models_list_virtual_policies_and_every_expert(client, http):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["coe", "coe-keyword"] and "smollm2-math" in ids and "smollm2-135m" in ids
    assert client.models.retrieve("smollm2-math").id == "smollm2-math"
    assert http.get("/v1/models/gpt-99").status_code == 404


def test_chat_completion_with_routing_metadata_in_body_and_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model="coe", messages=[{"role": "user", "content": "a math question"}], max_tokens=8)
    reply = raw.parse()
    assert reply.choices[0].message.content == "smollm2-math: a math question"
    assert raw.headers["x-coe-experts"] == "smollm2-math" and raw.headers["x-coe-policy"] == "keyword"
    assert raw.headers["x-coe-scores"].startswith("smollm2-math=1.0000,") and raw.headers["x-coe-fallback"] == "false"
    assert raw.headers["x-coe-aggregator"] == "passthrough" and float(raw.headers["x-coe-load-seconds"]) >= 0
    coe = reply.model_extra["coe"]
    assert coe["answered_by"] == ["smollm2-math"] and coe["incidents"] == [] and "load" in coe["timings"]


def test_streaming_uses_the_openai_chunk_format(client, http):
    stream = client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "a science question"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "smollm2-science: a science question"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["coe"]["answered_by"] == ["smollm2-science"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    with http.stream("POST", "/v1/chat/completions", json=ask(stream=True)) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-coe-experts"] == "smollm2-math"
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_a_failing_expert_falls_back_and_says_so():
    backend = FaultyBackend(ScriptedBackend(), FaultConfig(experts=["smollm2-math"], rate=1.0))
    http = TestClient(build_api(LocalPipelineClient(make_pipeline(backend, ResilienceConfig(cooldown_failures=100)))))
    reply = http.post("/v1/chat/completions", json=ask())
    assert reply.status_code == 200 and reply.headers["x-coe-fallback"] == "true"
    coe = reply.json()["coe"]
    assert coe["answered_by"] == ["smollm2-135m"] and [i["kind"] for i in coe["incidents"]] == ["error", "error", "fallback"]
    streamed = http.post("/v1/chat/completions", json=ask(stream=True)).text
    assert "smollm2-135m: What is 2 + 2 in math?" in "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in streamed.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"])
    named = http.post("/v1/chat/completions", json={**ask(), "model": "smollm2-math"})
    assert named.status_code == 503 and "no other expert" in named.json()["error"]["message"]
    named_stream = http.post("/v1/chat/completions", json={**ask(), "model": "smollm2-math", "stream": True})
    assert named_stream.status_code == 200 and '"type": "service_unavailable"' in named_stream.text
    assert named_stream.text.endswith("data: [DONE]\n\n")


BAD_BODIES = {
    "empty messages": {"messages": []},
    "no user message": {"messages": [{"role": "system", "content": "be brief"}]},
    "blank user message": {"messages": [{"role": "user", "content": "   "}]},
    "messages of the wrong type": {"messages": "hi"},
    "a message of the wrong type": {"messages": [42]},
    "unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "oversized message": {"messages": [{"role": "user", "content": "x" * 40_000}]},
    "oversized in all": {"messages": [{"role": "user", "content": "x" * 20_000}] * 2},
    "temperature out of range": {**ask(), "temperature": 9},
    "top_p zero": {**ask(), "top_p": 0},
    "max_tokens zero": {**ask(), "max_tokens": 0},
    "max_tokens huge": {**ask(), "max_tokens": 10**9},
    "max_tokens as text": {**ask(), "max_tokens": "many"},
    "negative seed": {**ask(), "seed": -1},
    "n above 1": {**ask(), "n": 3},
    "five stop strings": {**ask(), "stop": ["a", "b", "c", "d", "e"]},
    "stream not a bool": {**ask(), "stream": "yes please"},
    "empty model": {**ask(), "model": ""},
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_bad_input_is_a_4xx_with_a_clear_message(http, name):
    reply = http.post("/v1/chat/completions", json=BAD_BODIES[name])
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and 10 < len(error["message"]) < 300


def test_malformed_json_unknown_model_path_and_size(http):
    reply = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    unknown = http.post("/v1/chat/completions", json={**ask(), "model": "gpt-99"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert "coe-keyword" in unknown.json()["error"]["message"]  # says what exists
    assert http.post("/v1/route", json={**ask(), "model": "gpt-99"}).status_code == 404
    assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert http.get("/v1/chat/completions").status_code == 405
    huge = http.post("/v1/chat/completions", content=b"x" * 2_000_000, headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["message"]


def test_a_chunked_body_is_limited_by_the_bytes_received(http):
    """No Content-Length (chunked transfer): the limit holds on the bytes as they arrive."""
    def chunks(body: bytes, size: int = 64 * 1024):
        yield from (body[i:i + size] for i in range(0, len(body), size))

    small = json.dumps(ask()).encode()
    reply = http.post("/v1/chat/completions", content=chunks(small), headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text
    assert "content-length" not in reply.request.headers and reply.request.headers["transfer-encoding"] == "chunked"
    padded = json.dumps(ask("x" * 10, user="y" * 1_200_000)).encode()
    huge = http.post("/v1/chat/completions", content=chunks(padded), headers={"content-type": "application/json"})
    assert huge.status_code == 413, huge.text
    error = huge.json()["error"]
    assert error["type"] == "invalid_request_error" and "1000000 bytes" in error["message"]


def test_api_keys(http):
    anonymous = TestClient(http.app)
    assert anonymous.post("/v1/chat/completions", json=ask()).status_code == 401
    assert anonymous.get("/v1/models", headers={"authorization": "Bearer nope"}).json()["error"]["code"] == "invalid_api_key"
    assert anonymous.get("/health").status_code == 200 and anonymous.get("/metrics").status_code == 200


def test_metrics_count_policy_expert_and_fallbacks(http):
    http.post("/v1/chat/completions", json=ask("a medicine question"))
    text = http.get("/metrics").text
    assert 'coe_answered_total{expert="smollm2-medicine",policy="keyword"}' in text
    assert 'coe_expert_generate_seconds_bucket{expert="smollm2-medicine"' in text
    assert "coe_in_flight_requests" in text


class PooledBackend(ScriptedBackend):
    """The scripted backend with a real tiered pool (simulated moves): a device that holds the
    base and one adapter."""

    def __init__(self):
        from experts.pool import SimulatedMover, TierBudgets, TieredPool

        super().__init__()
        catalog = load_catalog()
        base, adapter = catalog.get("smollm2-135m").size_bytes, catalog.get("smollm2-math").size_bytes
        self.pool = TieredPool(TierBudgets(device=base + adapter, host=2 * base), SimulatedMover())
        self.pool.add_catalog(catalog)

    def load(self, expert):
        return self.pool.ensure(expert)

    def resident(self):
        return self.pool.residence()


def test_pool_residence_and_moves_in_v1_pool_and_metrics():
    http = TestClient(build_api(LocalPipelineClient(make_pipeline(PooledBackend()))))
    for question in ("a math question", "a medicine question"):
        assert http.post("/v1/chat/completions", json=ask(question)).status_code == 200
    [report] = http.get("/v1/pool").json()["data"]
    assert report["residence"]["smollm2-medicine"] == "device" and report["residence"]["smollm2-135m"] == "device"
    assert report["residence"]["smollm2-math"] == "host"  # evicted: the device holds one adapter
    assert report["stats"]["loads"] == 3 and report["stats"]["evictions"] == 1
    assert report["usage"]["device"]["resident"] <= report["usage"]["device"]["budget"]
    value = metric_values(http.get("/metrics").text)
    assert value("coe_expert_resident", expert="smollm2-medicine", tier="device", where="local") == 1
    assert value("coe_expert_resident", expert="smollm2-math", tier="host", where="local") == 1
    assert value("coe_pool_loads_total", where="local") == 3 and value("coe_pool_evictions_total", where="local") == 1
    assert value("coe_pool_moved_bytes_total", edge="device->host", where="local") == load_catalog().get("smollm2-math").size_bytes
    assert value("coe_pool_bytes", kind="budget", tier="device", where="local") == report["usage"]["device"]["budget"]


def metric_values(text: str):
    """A lookup of the samples of a Prometheus text page: value(name, **labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))))


def test_a_failing_pool_report_does_not_fail_the_scrape():
    class Unreachable(LocalPipelineClient):
        async def pool_reports(self):
            raise ConnectionError("pool replica restarting")

    http = TestClient(build_api(Unreachable(make_pipeline())))
    before = metric_values(http.get("/metrics").text)("coe_pool_report_errors_total")
    after = http.get("/metrics")
    assert after.status_code == 200
    assert metric_values(after.text)("coe_pool_report_errors_total") == before + 1


# -- fuzzing ---------------------------------------------------------------------------------

fuzz_app = build_api(LocalPipelineClient(make_pipeline()))
schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


@schema.parametrize()
@settings(max_examples=40, deadline=None)
def test_fuzz_never_a_server_error(case):
    """Generated valid and invalid requests for every operation: never a 5xx, always the documented shape."""
    response = case.call()
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) >= {"message", "type"}


def test_the_schema_generates_requests_the_app_answers_and_requests_it_rejects():
    """The fuzz above is not vacuous: from the same schema, valid chat requests are answered and
    invalid ones rejected (a fixed seed: the same cases every run, in any test order)."""
    from hypothesis import HealthCheck, given
    from schemathesis import GenerationMode

    operation = schema["/v1/chat/completions"]["POST"]
    statuses: dict[GenerationMode, set[int]] = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        seen: set[int] = set()

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        def call(case):
            seen.add(case.call().status_code)

        call()
        statuses[mode] = seen
    assert 200 in statuses[GenerationMode.POSITIVE], statuses
    assert any(400 <= s < 500 for s in statuses[GenerationMode.NEGATIVE]), statuses
    assert all(s < 500 for seen in statuses.values() for s in seen), statuses
