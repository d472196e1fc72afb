"""The remote backend against real HTTP servers on localhost (no model: tests/upstream.py answers
from a word list), for the status cases a model server is not asked to produce: 429, 500, 400,
a hanging upstream, one killed mid-stream, an unreachable port; connection reuse, the concurrency
bound, and the API key kept out of logs and errors. test_remote_vllm.py runs it on vLLM's server."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.catalog import Catalog, ExpertSpec, RemoteWeights
from core.errors import CoeError
from core.types import GenerationParams, GenerationRequest, Message
from experts.backends.remote import RemoteBackend, RemoteExpertError, RemoteRequestError, RemoteTimeoutError
from tests.conftest import free_port
from tests.upstream import Upstream

KEY_ENV = "COE_TEST_UPSTREAM_KEY"
KEY = "sk-upstream-" + os.urandom(8).hex()  # a fresh secret, so finding it anywhere means it leaked


def remote_catalog(url: str, models: list[str], **weights) -> Catalog:
    experts = [ExpertSpec(name=f"r-{m}", kind="base", description=m, context_length=4096, prices={"input": 1, "output": 2},
                          weights=RemoteWeights(base_url=url, model=m, api_key_env=KEY_ENV, **weights))
               for m in models]
    return Catalog(experts=experts, default_expert=experts[0].name)


def request(expert: str, stream: bool = False, max_tokens: int = 5) -> GenerationRequest:
    return GenerationRequest(expert=expert, messages=[Message(role="user", content="Count.")],
                             params=GenerationParams(max_tokens=max_tokens), stream=stream)


async def collect(backend, req):
    return [piece async for piece in backend.astream(req)]


@pytest.fixture(scope="module")
def upstream():
    with Upstream(free_port()) as server:
        yield server


@pytest.fixture()
def backend(upstream, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    remote = RemoteBackend(remote_catalog(upstream.url, ["ok", "busy", "broken", "bad", "hang", "slow"], timeout_seconds=1.0))
    yield remote
    remote.close()


def test_an_answer_and_a_stream_with_the_upstream_usage(backend, upstream):
    whole = asyncio.run(collect(backend, request("r-ok")))
    assert [p.text for p in whole] == ["one two three four five", ""]
    answer = whole[-1].answer
    assert (answer.expert, answer.text, answer.prompt_tokens, answer.completion_tokens, answer.finish_reason) == \
        ("r-ok", "one two three four five", 7, 5, "length")
    streamed = asyncio.run(collect(backend, request("r-ok", stream=True)))
    assert [p.text for p in streamed[:-1]] == ["one", " two", " three", " four", " five"]  # piece by piece
    assert streamed[-1].answer == answer
    assert upstream.state["authorizations"][-1] == f"Bearer {KEY}"  # the key reaches the upstream, and only it


def test_pieces_arrive_as_the_upstream_sends_them(backend):
    async def timed():
        started, times = time.perf_counter(), []
        async for piece in backend.astream(request("r-slow", stream=True)):
            times.append(time.perf_counter() - started)
        return times

    times = asyncio.run(timed())
    assert len(times) == 6 and times[0] < 0.6 and times[4] - times[0] > 0.6  # 0.2 s apart, not all at the end


def test_one_connection_is_reused_and_max_concurrency_bounds_requests_in_flight(upstream, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    backend = RemoteBackend(remote_catalog(upstream.url, ["slow"], max_concurrency=2))
    try:
        async def scenario():
            for _ in range(4):
                await backend.agenerate(request("r-slow"))
            seen = len(upstream.state["ports"])
            started = time.perf_counter()
            await asyncio.gather(*(backend.agenerate(request("r-slow")) for _ in range(6)))
            return seen, time.perf_counter() - started

        upstream.state["ports"].clear()
        upstream.state["peak"] = 0
        seen, seconds = asyncio.run(scenario())
        assert len(set(upstream.state["ports"][:seen])) == 1  # four calls in a row over one kept-alive connection
        assert upstream.state["peak"] == 2  # six at once, never more than two in flight
        assert seconds >= 3 * 0.3 - 0.05  # so they took three rounds
    finally:
        backend.close()


@pytest.mark.parametrize("model, status", [("busy", 429), ("broken", 500)])
def test_overload_and_server_errors_are_the_experts_failure(backend, model, status):
    with pytest.raises(RemoteExpertError, match=rf"remote expert 'r-{model}' \(http://127.0.0.1:\d+/v1\): HTTP {status}") as err:
        asyncio.run(collect(backend, request(f"r-{model}")))
    assert not isinstance(err.value, CoeError)  # the engine retries, falls back and cools the expert down


def test_a_hanging_upstream_times_out_as_the_experts_failure(backend):
    started = time.perf_counter()
    with pytest.raises(RemoteTimeoutError, match="remote expert 'r-hang'.*nothing within 1 s"):
        asyncio.run(collect(backend, request("r-hang", stream=True)))
    assert time.perf_counter() - started < 10
    assert isinstance(RemoteTimeoutError("x"), TimeoutError)


def test_a_bad_request_is_the_clients_error_with_its_status_and_without_the_key(backend):
    with pytest.raises(RemoteRequestError) as err:
        asyncio.run(collect(backend, request("r-bad")))
    assert isinstance(err.value, CoeError) and err.value.status_code == 400
    assert "HTTP 400: bad request from Bearer ***" in str(err.value)  # the upstream echoed the key: scrubbed


def test_an_unreachable_endpoint_names_the_expert(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    backend = RemoteBackend(remote_catalog(f"http://127.0.0.1:{free_port()}/v1", ["ok"]))
    with pytest.raises(RemoteExpertError, match=r"remote expert 'r-ok' \(http://127.0.0.1:\d+/v1\): connection failed"):
        backend.generate([request("r-ok")])
    assert isinstance(backend.check(["r-ok"])["r-ok"], RemoteExpertError)
    backend.close()


def test_a_missing_key_variable_is_named(upstream, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    backend = RemoteBackend(remote_catalog(upstream.url, ["ok"]))
    with pytest.raises(CoeError, match=f"remote expert 'r-ok': its API key variable {KEY_ENV} is not set"):
        backend.generate([request("r-ok")])


def test_an_upstream_killed_mid_stream_raises_the_experts_failure(monkeypatch):
    """A real upstream process, killed (SIGKILL) after the first piece reached us."""
    monkeypatch.setenv(KEY_ENV, KEY)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.upstream", str(port)], cwd=Path(__file__).parent.parent,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backend = RemoteBackend(remote_catalog(f"http://127.0.0.1:{port}/v1", ["slow"], timeout_seconds=5.0))
    try:
        deadline = time.monotonic() + 60
        while not isinstance(backend.check(["r-slow"])["r-slow"], str):
            assert time.monotonic() < deadline, "the upstream process did not start"
            time.sleep(0.2)

        async def scenario():
            received = []
            with pytest.raises((RemoteExpertError, RemoteTimeoutError)) as err:
                async for piece in backend.astream(request("r-slow", stream=True, max_tokens=10)):
                    received.append(piece.text)
                    if len(received) == 1:
                        server.kill()
            return received, err.value

        received, error = asyncio.run(scenario())
        assert received[0] == "one" and len(received) < 10 and "r-slow" in str(error)
        assert not isinstance(error, CoeError)
    finally:
        server.kill()
        server.wait()
        backend.close()


def test_the_key_never_reaches_a_log_an_error_or_the_residence(backend, upstream, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the openai and httpx clients' debug lines included
    errors = []
    for model in ("ok", "busy", "broken", "bad", "hang"):
        for stream in (False, True):
            try:
                asyncio.run(collect(backend, request(f"r-{model}", stream=stream)))
            except Exception as exc:
                errors.append(exc)
    errors += [r for r in backend.check(["r-ok", "r-bad"]).values() if isinstance(r, Exception)]
    assert len(errors) == 8 and caplog.records  # the failures happened, and the clients logged
    assert upstream.state["authorizations"].count(f"Bearer {KEY}") >= 10  # ... with the key sent every time
    for text in [caplog.text, *map(str, errors), *map(repr, errors), str(backend.resident()),
                 backend.catalog.model_dump_json()]:
        assert KEY not in text
