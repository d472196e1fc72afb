"""Crash recovery on a real Serve app: the expert-pool replica is killed (SIGKILL, as the kernel's
OOM killer would) while chat requests are in flight. Every request gets an answer (200, through a
retry or a fallback) or a clean 503 in the OpenAI format, none hangs, Serve starts a new replica,
and requests after it succeed.

The app is its own (under /crash-BACKEND, beside the session's app of tests/test_serve.py), so
killing its replica disturbs no other test. It runs on transformers in the default suite and on
vLLM, `coe serve`'s default, in the slow tier (a replica with a vLLM engine takes ~30 s to come
back, and its engine dies with it)."""

import concurrent.futures
import json
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import SERVE_BACKENDS, backend_settings

POOL = "ExpertPool-smollm2-135m"
CLIENT_TIMEOUT = 180  # seconds: a request with no answer by then has hung
MAX_TOKENS = 48  # per request: seconds of generation on this CPU, so requests are mid-answer at the kill
BUSY_CPU_SECONDS = 0.5  # the replica's CPU time since the requests went out: it is generating


@pytest.fixture(scope="module", params=SERVE_BACKENDS)
def crash_app(serve_url, request):
    from ray import serve

    from core.config import CoeConfig
    from deploy.app import build_app

    config = CoeConfig.model_validate({
        "backend": backend_settings(request.param),
        "resilience": {"timeout_seconds": 90},
        # small reservations: this app runs beside the session's two on a 2-CPU Ray
        "serve": {"ingress": {"ray_actor_options": {"num_cpus": 0}},
                  "pools": {"default": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 64}}},
    })
    app = f"coe-crash-{request.param}"
    serve.run(build_app(config), name=app, route_prefix=f"/crash-{request.param}")
    yield app, f"{serve_url}/crash-{request.param}"
    serve.delete(app)


def pool_processes(app: str) -> list[psutil.Process]:
    """The worker processes of the app's expert-pool replicas (Ray titles them ray::ServeReplica:<app>:<deployment>)."""
    title = f"ray::ServeReplica:{app}:{POOL}"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(title):
            found.append(process)
    return found


def chat(url: str, model: str, prompt: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=CLIENT_TIMEOUT, json={
        "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]})


def chat_stream(url: str, prompt: str, max_tokens: int) -> tuple[int, list[dict]]:
    """Status and SSE events of a streamed request, read to its end."""
    body = {"model": "coe", "max_tokens": max_tokens, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT) as reply:
        if reply.status_code != 200:
            reply.read()
            return reply.status_code, [reply.json()]
        events = [line[len("data: "):] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]  # every stream ends, cleanly, whatever happened
    return 200, [json.loads(e) for e in events[:-1]]


def assert_clean(reply: httpx.Response) -> None:
    """200 with an answer, or a 503 in the OpenAI error format; never a 500."""
    assert reply.status_code in (200, 503), (reply.status_code, reply.text)
    if reply.status_code == 200:
        assert reply.json()["choices"][0]["message"]["content"].strip()
    else:
        assert reply.json()["error"]["message"]


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time of the replica and its children (a vLLM replica computes in its engine process)."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def test_a_pool_replica_killed_mid_run_is_restarted_and_nothing_hangs(crash_app):
    from ray import serve

    app, crash_url = crash_app
    counting = "Count from 1 to 300, separated by commas."
    warm = chat(crash_url, "coe", counting, 4)
    assert warm.status_code == 200, warm.text  # warm: the experts are on the replica
    [victim] = pool_processes(app)

    # Few and short enough that all of them, redone after the kill on the one new replica, finish well
    # within CLIENT_TIMEOUT on a busy 2-core machine (12 requests of 96 tokens did not: 3 min), and
    # long enough that they are still generating when it dies.
    jobs = [("coe", i) for i in range(4)] + [("smollm2-135m", i) for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs) + 2) as pool:
        started = time.monotonic()
        busy_from = cpu_seconds(victim)
        replies = [pool.submit(chat, crash_url, model, f"{counting} ({i})", MAX_TOKENS) for model, i in jobs]
        streams = [pool.submit(chat_stream, crash_url, f"{counting} [{i}]", MAX_TOKENS) for i in range(2)]
        deadline = time.monotonic() + 60
        while cpu_seconds(victim) - busy_from < BUSY_CPU_SECONDS:  # the requests reached the pool and generate
            assert time.monotonic() < deadline, "the pool replica never started generating"
            time.sleep(0.05)
        in_flight = sum(not f.done() for f in replies + streams)
        os.kill(victim.pid, signal.SIGKILL)
        replies = [f.result() for f in replies]  # raises if any request hung past CLIENT_TIMEOUT
        streams = [f.result() for f in streams]
    assert in_flight >= len(jobs) // 2, f"only {in_flight} requests were in flight when the replica died"
    assert time.monotonic() - started < CLIENT_TIMEOUT

    for reply in replies:
        assert_clean(reply)
    named = [r for (model, _), r in zip(jobs, replies) if model == "smollm2-135m"]
    for reply in named:  # one named expert: nothing to fall back to, so a clean 503 or an answer
        if reply.status_code == 503:
            assert "smollm2-135m" in reply.json()["error"]["message"]
    for status, events in streams:
        assert status in (200, 503), events
        last = events[-1]
        if "error" in last:  # before the first token a 503 reply, after it an error event; never a server_error
            assert last["error"]["type"] == "service_unavailable" and last["error"]["message"], last
        else:  # or the answer to its end
            assert last["choices"][0]["finish_reason"] in ("stop", "length"), last

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # Serve's controller replaces the dead replica
        status = serve.status().applications[app].deployments[POOL].status
        fresh = [p for p in pool_processes(app) if p.pid != victim.pid]
        if status == "HEALTHY" and fresh:
            break
        time.sleep(1)
    assert status == "HEALTHY" and fresh, status
    assert not victim.is_running()

    after = [chat(crash_url, model, "What is 2 + 2?", 8) for model in ("coe", "smollm2-135m", "coe")]
    assert [r.status_code for r in after] == [200, 200, 200], [r.text for r in after]
