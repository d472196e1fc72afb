"""A real second OpenAI-compatible server as the remote expert: vLLM's own OpenAI server over the
converted SmolLM2, started once for these tests (about a minute on 2 CPU cores; run this file
through `heavy`), with an API key. The remote backend's answers and streams are the server's
own, with its usage; its refusals map to the expert's failure or the client's error; a remote
expert writes a synthesis of local experts' answers, streamed; and `coe experts check` says which
experts answer."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.catalog import Catalog, ExpertSpec, RemoteWeights, load_catalog
from core.errors import CoeError
from core.types import GenerationParams, GenerationRequest, Message, Query, Result, StreamPiece
from experts.backends import CompositeBackend
from experts.backends.remote import RemoteBackend, RemoteExpertError, RemoteRequestError
from orchestrator.aggregators import synthesis_messages
from orchestrator.pipeline import Pipeline
from tests.fakes import ScriptedBackend, ScriptedRouter
from tests.conftest import VLLM_SERVER_KEY as KEY
from tests.conftest import VLLM_SERVER_MODEL as MODEL
from tests.conftest import free_port

pytest.importorskip("vllm", reason="the vLLM engine is not installed (scripts/install.sh installs it)")

KEY_ENV = "COE_TEST_VLLM_KEY"
COE = str(Path(sys.executable).with_name("coe"))
QUESTION = [Message(role="user", content="Name three colours of the rainbow.")]


def vllm_catalog(url: str, model: str = MODEL, key_env: str = KEY_ENV) -> Catalog:
    expert = ExpertSpec(name="far-smollm2", kind="base", description="SmolLM2 on another server", context_length=1024,
                        params=134515008, weights=RemoteWeights(base_url=url, model=model, api_key_env=key_env))
    return Catalog(experts=[expert], default_expert=expert.name)


@pytest.fixture()
def remote(vllm_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    backend = RemoteBackend(vllm_catalog(vllm_server))
    yield backend
    backend.close()


def ask(stream: bool, max_tokens: int = 16, messages=QUESTION) -> GenerationRequest:
    return GenerationRequest(expert="far-smollm2", messages=messages, params=GenerationParams(max_tokens=max_tokens),
                             stream=stream)


async def pieces_of(backend, request):
    return [piece async for piece in backend.astream(request)]


def test_answers_are_the_servers_own_with_its_usage_streamed_token_by_token(remote, vllm_server):
    from openai import OpenAI

    direct = OpenAI(base_url=vllm_server, api_key=KEY, max_retries=0).chat.completions.create(
        model=MODEL, messages=[m.wire() for m in QUESTION], max_tokens=16, temperature=0)
    whole = asyncio.run(pieces_of(remote, ask(stream=False)))[-1].answer
    assert whole.text == direct.choices[0].message.content.strip() and whole.text
    assert (whole.prompt_tokens, whole.completion_tokens) == (direct.usage.prompt_tokens, direct.usage.completion_tokens)
    assert whole.finish_reason == ("length" if direct.choices[0].finish_reason == "length" else "stop")

    streamed = asyncio.run(pieces_of(remote, ask(stream=True)))
    texts, answer = [p.text for p in streamed[:-1]], streamed[-1].answer
    assert answer == whole  # the same greedy answer and usage, streamed
    assert "".join(texts).strip() == whole.text
    assert len(texts) >= whole.completion_tokens - 2 > 1  # one piece per token (less any whitespace-only ones)

    # The synchronous API, two requests at once (batched upstream: not bit-equal to one alone).
    batch = remote.generate([ask(stream=False), ask(stream=False, max_tokens=4)])
    assert [a.prompt_tokens for a in batch] == [whole.prompt_tokens] * 2 and batch[1].completion_tokens == 4
    assert batch[0].text and 0 < batch[0].completion_tokens <= 16


def test_refusals_map_to_the_experts_failure_or_the_clients_error(vllm_server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    long_prompt = [Message(role="user", content="word " * 1500)]
    remote = RemoteBackend(vllm_catalog(vllm_server))
    with pytest.raises(RemoteRequestError, match="HTTP 400: .*maximum context length is 1024") as too_long:
        remote.generate([ask(stream=False, messages=long_prompt)])
    assert too_long.value.status_code == 400  # the client's error: no retry, no fallback
    remote.close()

    wrong_model = RemoteBackend(vllm_catalog(vllm_server, model="not-served"))
    with pytest.raises(RemoteExpertError, match="HTTP 404") as missing:  # the catalog is wrong: the expert fails
        wrong_model.generate([ask(stream=True)])
    assert "does not serve model 'not-served'" in str(wrong_model.check(["far-smollm2"])["far-smollm2"])
    wrong_model.close()

    monkeypatch.setenv("COE_TEST_WRONG_KEY", "sk-wrong-" + os.urandom(4).hex())
    wrong_key = RemoteBackend(vllm_catalog(vllm_server, key_env="COE_TEST_WRONG_KEY"))
    with pytest.raises(RemoteExpertError, match="HTTP 401: the endpoint refused the key in COE_TEST_WRONG_KEY") as refused:
        asyncio.run(pieces_of(wrong_key, ask(stream=True)))
    wrong_key.close()
    for error in (missing.value, refused.value):
        assert not isinstance(error, CoeError)
    for text in (caplog.text, str(too_long.value), str(missing.value), str(refused.value)):
        assert KEY not in text and os.environ["COE_TEST_WRONG_KEY"] not in text


def test_a_remote_expert_writes_the_synthesis_of_local_answers_and_streams_it(vllm_server, monkeypatch):
    from openai import OpenAI

    monkeypatch.setenv(KEY_ENV, KEY)
    local, far = load_catalog(), vllm_catalog(vllm_server).experts[0]
    catalog = local.model_copy(update={"experts": [*local.experts, far]})
    remote = RemoteBackend(catalog.subset([far.name]))
    backend = CompositeBackend(catalog, {"scripted": ScriptedBackend(), "remote": remote},
                               {**{e.name: "scripted" for e in local.experts}, far.name: "remote"}, {}, "scripted")
    question = QUESTION[0].content
    router = ScriptedRouter({question: (["smollm2-science", "smollm2-logic"], 2, "synthesis")}, aggregator_expert=far.name)
    pipeline = Pipeline(catalog, backend, {"scripted": router}, "scripted")
    query = Query(id="q", messages=QUESTION, params=GenerationParams(max_tokens=16))
    try:
        [result] = pipeline.run([query])
        assert result.experts == ["smollm2-science", "smollm2-logic"] and result.aggregated_by == far.name
        # What the server answers when asked directly for the synthesis of the same two answers.
        synthesis = synthesis_messages(query, result.answers)
        assert "Answer 2 (smollm2-logic):\nsmollm2-logic: " + question in synthesis[-1].content
        direct = OpenAI(base_url=vllm_server, api_key=KEY, max_retries=0).chat.completions.create(
            model=MODEL, messages=[m.wire() for m in synthesis], max_tokens=16, temperature=0)
        written = result.aggregator_answer
        assert written.prompt_tokens == direct.usage.prompt_tokens  # the server was asked that very conversation
        assert result.text == written.text and result.text
        assert result.usage.completion_tokens == 2 + 2 + written.completion_tokens  # two local answers, then the synthesis

        async def stream():
            return [event async for event in pipeline.astream(query.model_copy(update={"id": "s"}))]

        events = asyncio.run(stream())
        pieces = [e.text for e in events if isinstance(e, StreamPiece)]
        assert isinstance(events[-1], Result) and events[-1].aggregated_by == far.name
        assert len(pieces) > 2  # the aggregator's tokens, as it writes them
        # The server's own greedy answer. (Compared with the stream, not the first run: in bf16 with
        # prefix caching, a prompt's first computation and its cached one can part at a near-tie,
        # and the direct call and the stream both run on the cached prefix.)
        assert "".join(pieces).strip() == events[-1].text == direct.choices[0].message.content.strip()
    finally:
        pipeline.close()
        backend.close()


def test_experts_check_says_which_experts_answer(vllm_server, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    entries = [
        {"name": "far-smollm2", "kind": "base", "description": "d", "context_length": 1024,
         "prices": {"input": 0.1, "output": 0.2},
         "weights": {"source": "remote", "base_url": vllm_server, "model": MODEL, "api_key_env": KEY_ENV}},
        {"name": "gone-optional", "kind": "base", "description": "d", "optional": True,
         "weights": {"source": "path", "path": "models/nothing"}},
        {"name": "dead", "kind": "base", "description": "d", "context_length": 4096, "params": 1000,
         "weights": {"source": "remote", "base_url": dead, "model": "x", "timeout_seconds": 2}},
    ]
    config = tmp_path / "coe.yaml"
    config.write_text("catalog: catalog.yaml\nbackend: {name: hf}\n")

    def check(experts):
        catalog.write_text(json.dumps({"default_expert": "far-smollm2", "experts": experts}))
        return subprocess.run([COE, "experts", "check", "--config", str(config), "--json"], capture_output=True, text=True,
                              timeout=120, env={**os.environ, KEY_ENV: KEY})

    run = check(entries)
    assert run.returncode == 1, run.stderr  # `dead` is not optional
    rows = {r["name"]: r for r in json.loads(run.stdout)}
    assert rows["far-smollm2"]["ok"] and rows["far-smollm2"]["detail"] == f"{vllm_server} serves {MODEL}"
    assert rows["far-smollm2"]["context_length"] == 1024 and rows["far-smollm2"]["prices"]["input"] == 0.1
    assert not rows["dead"]["ok"] and "remote expert 'dead'" in rows["dead"]["detail"] and "connection failed" in rows["dead"]["detail"]
    assert rows["dead"]["prices"]["derived"] and rows["dead"]["backend"] == "remote"
    assert not rows["gone-optional"]["ok"] and rows["gone-optional"]["optional"]
    assert "expert 'gone-optional'" in rows["gone-optional"]["detail"] and "does not exist" in rows["gone-optional"]["detail"]
    assert KEY not in run.stdout + run.stderr

    run = check(entries[:2])  # only an optional expert fails
    assert run.returncode == 0, run.stdout + run.stderr
    table = subprocess.run([COE, "experts", "check", "--config", str(config)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, KEY_ENV: KEY})
    assert table.returncode == 0 and "far-smollm2" in table.stdout and "ok" in table.stdout
