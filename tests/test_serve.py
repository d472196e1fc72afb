"""The real Ray Serve application on localhost, driven with the `openai` client."""

import httpx
import openai
import pytest

from tests.conftest import API_KEY

AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_chat_completion_through_the_router(client):
    reply = client.chat.completions.create(
        model="coe", messages=[{"role": "user", "content": "What is 17 * 23?"}], max_tokens=24)
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    coe = reply.model_extra["coe"]
    assert coe["policy"] == "knn" and [e["name"] for e in coe["experts"] if e["chosen"]] == ["smollm2-math"]


def test_concrete_expert_and_routing_headers(client, serve_url):
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
    assert raw.headers["x-coe-experts"] == "smollm2-135m"
    assert "Paris" in raw.parse().choices[0].message.content


def test_models_lists_policies_and_experts(client):
    ids = {m.id for m in client.models.list().data}
    assert {"coe", "coe-knn", "smollm2-135m", "smollm2-math", "smollm2-medicine"} <= ids


def test_concurrent_requests_are_all_answered(serve_url):
    import concurrent.futures

    def one(i):
        return httpx.post(f"{serve_url}/v1/chat/completions", timeout=300, headers=AUTH, json={
            "model": "coe", "max_tokens": 8, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(8)))
    assert [r.status_code for r in replies] == [200] * 8


def test_bad_requests_get_openai_errors(client, serve_url):
    with pytest.raises(openai.NotFoundError, match="unknown policy or expert"):
        client.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="coe", messages=[])
    bad_type = httpx.post(f"{serve_url}/v1/chat/completions", headers=AUTH, json={"model": "coe", "messages": "hi"})
    assert bad_type.status_code == 400 and bad_type.json()["error"]["type"] == "invalid_request_error"
    bad_json = httpx.post(f"{serve_url}/v1/chat/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert bad_json.status_code == 400
    assert httpx.get(f"{serve_url}/health").json() == {"status": "ok"}
    no_user = httpx.post(f"{serve_url}/v1/chat/completions", headers=AUTH,
                         json={"messages": [{"role": "system", "content": "be brief"}]})
    assert no_user.status_code == 400 and "user message" in no_user.json()["error"]["message"]
    too_long = httpx.post(f"{serve_url}/v1/chat/completions", headers=AUTH,
                          json={"messages": [{"role": "user", "content": "x" * 40_000}]})
    assert too_long.status_code == 400
    out_of_range = httpx.post(f"{serve_url}/v1/chat/completions", headers=AUTH,
                              json={"messages": [{"role": "user", "content": "hi"}], "temperature": 9})
    assert out_of_range.status_code == 400 and "temperature" in out_of_range.json()["error"]["message"]


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
    client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=4)
    text = httpx.get(f"{serve_url}/metrics").text
    assert 'coe_requests_total{endpoint="chat",policy="knn",status="200"}' in text
    assert 'coe_routed_total{expert="smollm2-math",policy="knn"}' in text
    assert "coe_request_latency_seconds_bucket" in text


def test_key_check_without_and_with_keys():
    from deploy.app import authorized

    assert authorized("", []) and authorized("Bearer anything", [])
    assert authorized("Bearer k1", [b"k0", b"k1"]) and authorized("bearer k1", [b"k1"])
    assert not authorized("Bearer k", [b"k1"]) and not authorized("k1", [b"k1"]) and not authorized("", [b"k1"])


def test_the_replica_runs_vllm_where_it_is_installed(serve_url):
    """`coe serve`'s default backend: the vLLM engine inside the Serve replica, transformers without it."""
    from experts.backends import vllm_installed

    body = httpx.get(f"{serve_url}/v1/models", headers=AUTH).json()
    assert body["coe"]["backend"] == ("vllm" if vllm_installed() else "hf")
