"""The real Ray Serve application on localhost, driven with the `openai` client."""

import concurrent.futures

import httpx
import openai
import pytest

from tests.conftest import API_KEY, FAULTY_EXPERT

AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_the_application_graph(serve_url):
    from ray import serve

    app = serve.status().applications["coe"]
    assert set(app.deployments) == {"CoeIngress", "ExpertPool-smollm2-135m"}
    assert all(d.status == "HEALTHY" for d in app.deployments.values())


def test_chat_completion_through_the_router(client):
    raw = client.chat.completions.with_raw_response.create(
        model="coe", messages=[{"role": "user", "content": "What is 17 * 23?"}], max_tokens=24)
    reply = raw.parse()
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    coe = reply.model_extra["coe"]
    assert coe["policy"] == "knn" and [e["name"] for e in coe["experts"] if e["chosen"]] == ["smollm2-math"]
    assert coe["answered_by"] == ["smollm2-math"] and not coe["fallback"]
    assert raw.headers["x-coe-experts"] == "smollm2-math" and "smollm2-math=" in raw.headers["x-coe-scores"]
    assert float(raw.headers["x-coe-load-seconds"]) >= 0 and raw.headers["x-coe-aggregator"] == "passthrough"


def test_streaming_chat_completion(client):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=question, max_tokens=16)
    with client.chat.completions.with_streaming_response.create(
            model="smollm2-135m", messages=question, max_tokens=16, stream=True,
            stream_options={"include_usage": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-coe-experts"] == "smollm2-135m"
        chunks = list(raw.parse())
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2  # token by token, not one lump
    assert "".join(pieces).strip() == whole.choices[0].message.content  # same greedy answer
    [last] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.model_extra["coe"]["answered_by"] == ["smollm2-135m"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_structured_output_embeddings_and_capabilities_through_serve(client, serve_url):
    """The router asks the pools' backend for capabilities; the embedder answers from the router."""
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    cards = {m.id: m.model_extra.get("coe") for m in client.models.list().data}
    vllm = client.models.list().model_extra["coe"]["backend"] == "vllm"
    assert cards["smollm2-math"]["capabilities"]["tools"] is False  # SmolLM2's template renders no tools
    assert cards["smollm2-math"]["capabilities"]["json_output"] is vllm
    if vllm:
        reply = client.chat.completions.parse(model="coe", messages=[{"role": "user", "content": "Ann is 30. As JSON."}],
                                              response_format=Person, max_tokens=48)
        assert isinstance(reply.choices[0].message.parsed, Person)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}])
    assert refused.value.body["param"] == "tools"
    vectors = client.embeddings.create(model="all-MiniLM-L6-v2", input=["What is 17 * 23?", "hello"])
    assert [len(d.embedding) for d in vectors.data] == [384, 384]


def test_models_lists_policies_and_experts(client):
    ids = {m.id for m in client.models.list().data}
    assert {"coe", "coe-knn", "coe-symbolic", "coe-glider", "coe-coe", "smollm2-135m", "smollm2-math",
            "smollm2-science", "smollm2-medicine", "smollm2-logic"} <= ids


def test_32_concurrent_requests_are_all_answered(serve_url):
    def one(i):
        return httpx.post(f"{serve_url}/v1/chat/completions", timeout=300, headers=AUTH, json={
            "model": "coe", "max_tokens": 4, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(one, range(32)))
    assert [r.status_code for r in replies] == [200] * 32
    assert max(r.json()["coe"]["batch"] for r in replies) > 1  # concurrent queries shared router batches


def test_bad_requests_get_openai_errors(client, serve_url):
    with pytest.raises(openai.NotFoundError, match="unknown policy or expert"):
        client.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="unknown policy or expert"):
        client.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="coe", messages=[])
    bad_type = httpx.post(f"{serve_url}/v1/chat/completions", headers=AUTH, json={"model": "coe", "messages": "hi"})
    assert bad_type.status_code == 400 and bad_type.json()["error"]["type"] == "invalid_request_error"
    bad_json = httpx.post(f"{serve_url}/v1/chat/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    assert httpx.get(f"{serve_url}/health").json() == {"status": "ok"}
    too_long = httpx.post(f"{serve_url}/v1/chat/completions", headers=AUTH,
                          json={"messages": [{"role": "user", "content": "x" * 40_000}]})
    assert too_long.status_code == 400 and "32000" in too_long.json()["error"]["message"]
    out_of_range = httpx.post(f"{serve_url}/v1/chat/completions", headers=AUTH,
                              json={"messages": [{"role": "user", "content": "hi"}], "temperature": 9})
    assert out_of_range.status_code == 400 and "temperature" in out_of_range.json()["error"]["message"]
    chunked = httpx.post(f"{serve_url}/v1/chat/completions", headers={**AUTH, "content-type": "application/json"},
                         content=iter([b'{"messages": [{"role": "user", "content": "', b"x" * 600_000, b"x" * 600_000, b'"}]}']))
    assert "content-length" not in chunked.request.headers  # through Serve's proxy, no length to trust
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"


def test_route_explains_without_generating(serve_url):
    reply = httpx.post(f"{serve_url}/v1/route", headers=AUTH, timeout=60, json={
        "model": "coe-knn", "messages": [{"role": "user", "content": "Which nerve supplies the deltoid muscle?"}]})
    assert reply.status_code == 200, reply.text
    decision = reply.json()
    assert decision["policy"] == "knn" and decision["ranked"][0]["expert"] == "smollm2-medicine"
    assert decision["explanation"]


def test_api_key_is_required(serve_url):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
        reply = httpx.post(f"{serve_url}/v1/chat/completions", headers=headers, json=body)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{serve_url}/v1/models").status_code == 401
    assert httpx.get(f"{serve_url}/health").status_code == 200  # probes need no key


def test_metrics_count_requests_and_routing(client, serve_url):
    client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "What is 17 * 23?"}], max_tokens=4)
    text = httpx.get(f"{serve_url}/metrics").text
    assert 'coe_requests_total{endpoint="chat",policy="knn",status="200"}' in text
    assert 'coe_routed_total{expert="smollm2-math",policy="knn"}' in text
    assert 'coe_request_latency_seconds_bucket{le="0.01",policy="knn",stream="false"}' in text
    assert 'coe_expert_generate_seconds_bucket{expert="smollm2-math"' in text


def test_where_experts_reside_over_http_and_in_the_cli(client, serve_url):
    import json
    import os
    import subprocess

    from tests.test_api import metric_values
    from tests.test_cli import COE

    def run(*args, env):
        return subprocess.run([COE, *args], capture_output=True, text=True, timeout=120, env=env)

    client.chat.completions.create(model="smollm2-math", messages=[{"role": "user", "content": "2 + 2?"}], max_tokens=2)
    [report] = httpx.get(f"{serve_url}/v1/pool", headers=AUTH).json()["data"]
    assert report["where"].startswith("smollm2-135m/")  # the family's pool replica
    assert report["residence"]["smollm2-135m"] == report["residence"]["smollm2-math"] == "device"
    value = metric_values(httpx.get(f"{serve_url}/metrics").text)
    assert value("coe_expert_resident", expert="smollm2-math", tier="device", where=report["where"]) == 1

    listed = run("experts", "list", "--url", serve_url, "--json", env={**os.environ, "COE_API_KEY": API_KEY})
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["smollm2-math"]["served"] == [{"where": report["where"], "tier": "device"}]
    no_key = run("experts", "list", "--url", serve_url, env={k: v for k, v in os.environ.items() if k != "COE_API_KEY"})
    assert no_key.returncode == 2 and "HTTP 401" in no_key.stderr and "COE_API_KEY" in no_key.stderr


def test_requests_for_an_expert_go_to_the_replica_holding_it(serve_url):
    """Two replicas of the family's pool, each holding at most two experts: once an expert is
    loaded, Serve's model multiplexing sends its requests to the replica that holds it."""
    import time

    from ray import serve

    from core.config import CoeConfig
    from deploy.app import build_app
    from deploy.manifests import pool_deployment_name

    config = CoeConfig.model_validate({
        "backend": {"name": "hf"},  # light replicas, whatever is installed
        "serve": {"pools": {"default": {"num_replicas": 2, "models_per_replica": 2,
                                        "ray_actor_options": {"num_cpus": 0.25}}}},
    })
    serve.run(build_app(config), name="coe-multiplex", route_prefix="/multiplex")
    try:
        pool = serve.get_deployment_handle(pool_deployment_name("smollm2-135m"), app_name="coe-multiplex")
        experts = ["smollm2-math", "smollm2-medicine", "smollm2-science", "smollm2-logic"]
        for expert in experts:
            pool.options(multiplexed_model_id=expert).load.remote().result()
        # Replicas report the experts they hold to Serve's request routers every few seconds: until
        # they have, a request may go to either replica. Poll until routing settles, at most 60 s.
        deadline = time.monotonic() + 60
        while True:
            reports = {e: [pool.options(multiplexed_model_id=e).report.remote().result() for _ in range(4)] for e in experts}
            settled = all(len({r["where"] for r in seen}) == 1 for seen in reports.values())
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for expert, seen in reports.items():
            assert len({r["where"] for r in seen}) == 1, f"{expert} went to several replicas"
            assert all(r["residence"][expert] == "device" for r in seen)
        assert len({seen[0]["where"] for seen in reports.values()}) == 2  # two experts per replica: both used
    finally:
        serve.delete("coe-multiplex")


def test_key_check_without_and_with_keys():
    from deploy.keys import KeyDenied, KeyGate

    assert not KeyGate.bare([]).enabled  # no keys: no auth
    gate = KeyGate.bare(["k0-secret", "k1-secret"])
    assert gate.authorize("Bearer k1-secret").name == "key-2" and gate.authorize("bearer k1-secret").admin
    for bad in ("Bearer k1", "k1-secret", ""):
        with pytest.raises(KeyDenied):
            gate.authorize(bad)


def test_the_replica_runs_vllm_where_it_is_installed(serve_url):
    """`coe serve`'s default backend: the vLLM engine inside the Serve replica, transformers without it."""
    from experts.backends import vllm_installed

    body = httpx.get(f"{serve_url}/v1/models", headers=AUTH).json()
    assert body["coe"]["backend"] == ("vllm" if vllm_installed() else "hf")


# -- the second application: small queues and a failing expert ------------------------------


def test_overload_gets_503_with_retry_after(faulty_serve_url):
    def one(i):
        return httpx.post(f"{faulty_serve_url}/v1/chat/completions", timeout=300, json={
            "model": "smollm2-135m", "max_tokens": 24, "messages": [{"role": "user", "content": f"Count to {i}."}]})

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(one, range(24)))
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 503}, statuses  # 4 running + 4 queued get answers, the rest are turned away
    rejected = next(r for r in replies if r.status_code == 503)
    assert rejected.headers["retry-after"] == "2" and rejected.json()["error"]["code"] == "overloaded"
    assert one(0).status_code == 200  # and it recovers


def test_a_failing_expert_is_retried_then_falls_back(faulty_serve_url):
    """The load test in short: every request answered, the faulty expert's share by a fallback."""
    from evals.bench_load import run_load

    # 20 requests: the first 20 of the interleaved held-out questions, five per task, so five math ones
    summary = run_load(faulty_serve_url, requests=20, concurrency=4, max_tokens=4, seed=1)
    assert summary["answered"] == summary["requests"] == 20 and summary["statuses"] == {"200": 20}, (
        summary["statuses"], summary["lost"], summary)
    assert summary["fallback_answers"] >= 4 and summary["retried"] == summary["fallback_answers"], summary
    assert FAULTY_EXPERT not in summary["answered_by"], summary
    text = httpx.get(f"{faulty_serve_url}/metrics").text
    assert f'coe_incidents_total{{expert="{FAULTY_EXPERT}",kind="error"}}' in text
