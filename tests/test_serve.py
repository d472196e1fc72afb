"""The real Ray Serve application on localhost, driven with the `openai` client."""

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=300)


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
        return httpx.post(f"{serve_url}/v1/chat/completions", timeout=300, json={
            "model": "coe", "max_tokens": 8, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(8)))
    assert [r.status_code for r in replies] == [200] * 8


def test_bad_requests_get_openai_errors(client, serve_url):
    with pytest.raises(openai.NotFoundError, match="unknown policy or expert"):
        client.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="coe", messages=[])
    bad_type = httpx.post(f"{serve_url}/v1/chat/completions", json={"model": "coe", "messages": "hi"})
    assert bad_type.status_code == 400 and bad_type.json()["error"]["type"] == "invalid_request_error"
    bad_json = httpx.post(f"{serve_url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert httpx.get(f"{serve_url}/health").json() == {"status": "ok"}
