"""Real clients against a real coe server, over real models (slow; run through `heavy`):

- a remote expert on vLLM's own OpenAI server (tests/conftest.py `vllm_server`, SmolLM2) behind
  coe's HTTP app served by uvicorn: the `openai` client's tool-calling and structured-output
  helpers (`client.chat.completions.parse`, `pydantic_function_tool`), streamed tool calls, n and
  logprobs, /v1/completions, and LiteLLM as a client (`model="openai/coe"` with `api_base`);
  SmolLM2 calls tools only when a tool_choice forces the call (vLLM decodes it under the tool's
  schema), so the tests force it;
- the local vLLM backend (tests/conftest.py `vllm_backend`): structured output through vLLM's
  guided decoding, logprobs, n and raw completions, and a 400 naming `tools` (SmolLM2's chat
  template renders no tools).
"""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest
from pydantic import BaseModel

from core.catalog import Catalog, ExpertSpec, RemoteWeights
from deploy.server import LocalPipelineClient, build_api
from experts.backends import build_backend
from orchestrator.pipeline import Pipeline
from tests.conftest import VLLM_SERVER_KEY, VLLM_SERVER_MODEL, free_port
from tests.fakes import ScriptedRouter

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="the vLLM engine is not installed (scripts/install.sh installs it)")

KEY_ENV = "COE_TEST_CLIENTS_VLLM_KEY"


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str


class Person(BaseModel):
    name: str
    age: int


def serve(pipeline: Pipeline):
    """coe's HTTP app over the pipeline on a free port (uvicorn in a thread): a real server."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(build_api(LocalPipelineClient(pipeline)), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the coe app did not start"
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.config.port}/v1"


@pytest.fixture(scope="module")
def coe_over_vllm_server(vllm_server):
    """coe with one expert: SmolLM2 on vLLM's OpenAI server, with every capability flag."""
    import os

    os.environ[KEY_ENV] = VLLM_SERVER_KEY
    expert = ExpertSpec(name="far-smollm2", kind="base", description="SmolLM2 on vLLM's server", context_length=1024,
                        params=134515008, weights=RemoteWeights(base_url=vllm_server, model=VLLM_SERVER_MODEL,
                                                                api_key_env=KEY_ENV, tools=True, json=True,
                                                                logprobs=True, n=True))
    catalog = Catalog(experts=[expert], default_expert=expert.name)
    pipeline = Pipeline(catalog, build_backend("hf", catalog), {"remote": ScriptedRouter({}, default=("far-smollm2",))},
                        "remote")
    server, url = serve(pipeline)
    yield url
    server.should_exit = True
    pipeline.close()


@pytest.fixture(scope="module")
def client(coe_over_vllm_server):
    return openai.OpenAI(base_url=coe_over_vllm_server, api_key="unused", max_retries=0)


WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_the_openai_clients_tool_helper_against_a_real_server(client):
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    reply = client.chat.completions.parse(model="coe", messages=WEATHER_QUESTION, tools=[tool], max_tokens=48,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(call.function.parsed_arguments, GetWeather)
    assert reply.model_extra["coe"]["answered_by"] == ["far-smollm2"]

    # The call's result goes back as a tool message; the answer is text.
    messages = [*WEATHER_QUESTION, choice.message,  # the parsed message as it came, as users append it
                {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    follow_up = client.chat.completions.create(model="coe", messages=messages, tools=[tool], max_tokens=16)
    assert follow_up.choices[0].message.content and follow_up.choices[0].finish_reason in ("stop", "length")


def test_tool_calls_stream_from_a_real_server(client):
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    chunks = list(client.chat.completions.create(model="coe", messages=WEATHER_QUESTION, tools=[tool], max_tokens=48,
                                                 tool_choice="required", stream=True))
    arguments = "".join(call.function.arguments or "" for c in chunks if c.choices
                        for call in c.choices[0].delta.tool_calls or [])
    names = [call.function.name for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []
             if call.function.name]
    assert names == ["get_weather"] and GetWeather.model_validate_json(arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_structured_output_helper_against_a_real_server(client):
    reply = client.chat.completions.parse(model="coe", messages=[{"role": "user", "content": "Ann is 30. As JSON."}],
                                          response_format=Person, max_tokens=48)
    assert isinstance(reply.choices[0].message.parsed, Person)


def test_n_logprobs_and_completions_through_a_real_server(client):
    reply = client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "Say hi."}], n=2,
                                           temperature=1.0, seed=3, max_tokens=6, logprobs=True, top_logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        tokens = choice.logprobs.content
        assert tokens and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
    text = client.completions.create(model="coe", prompt="The capital of France is", max_tokens=4, logprobs=2)
    logprobs = text.choices[0].logprobs
    assert text.choices[0].text and len(logprobs.tokens) == 4 and all(len(top) >= 1 for top in logprobs.top_logprobs)


def test_litellm_as_a_client(coe_over_vllm_server):
    litellm = pytest.importorskip("litellm", reason="the clients extra is not installed")

    reply = litellm.completion(model="openai/coe", api_base=coe_over_vllm_server, api_key="unused",
                               messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
    assert reply.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(
        model="openai/coe", api_base=coe_over_vllm_server, api_key="unused",
        messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, stream=True))
    assert streamed
    tools = [openai.pydantic_function_tool(GetWeather, name="get_weather")]
    called = litellm.completion(model="openai/coe", api_base=coe_over_vllm_server, api_key="unused",
                                messages=WEATHER_QUESTION, tools=tools, max_tokens=48,
                                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = called.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    embedded = litellm.embedding(model="openai/all-MiniLM-L6-v2", api_base=coe_over_vllm_server, api_key="unused",
                                 input=["What is 17 * 23?"])
    assert len(embedded.data[0]["embedding"]) == 384


# -- the local vLLM backend ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_client(vllm_backend):
    pipeline = Pipeline(vllm_backend.catalog, vllm_backend,
                        {"local": ScriptedRouter({}, default=("smollm2-135m", "smollm2-math"))}, "local")
    server, url = serve(pipeline)
    yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    server.should_exit = True
    pipeline.close()


def test_structured_output_logprobs_and_n_on_the_local_vllm_backend(local_client):
    for expert in ("smollm2-135m", "smollm2-math"):
        reply = local_client.chat.completions.parse(model=expert, response_format=Person, max_tokens=48,
                                                    messages=[{"role": "user", "content": "Ann is 30. As JSON."}])
        assert isinstance(reply.choices[0].message.parsed, Person), reply.choices[0].message.content
    anything = local_client.chat.completions.create(model="coe", response_format={"type": "json_object"}, max_tokens=64,
                                                    messages=[{"role": "user", "content": "Describe Ann as JSON."}])
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    reply = local_client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "Say hi."}], n=3,
                                                 temperature=1.0, seed=5, max_tokens=6, logprobs=True, top_logprobs=3)
    assert len(reply.choices) == 3 and all(len(c.logprobs.content) >= 1 for c in reply.choices)
    first = reply.choices[0].logprobs.content[0]
    assert first.top_logprobs[0].logprob >= first.top_logprobs[-1].logprob and len(first.top_logprobs) == 3
    text = local_client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4,
                                           logprobs=1)
    assert text.choices[0].text and len(text.choices[0].logprobs.tokens) >= 1


def test_the_embedded_experts_have_no_tools(local_client):
    with pytest.raises(openai.BadRequestError) as refused:
        local_client.chat.completions.create(model="coe", messages=WEATHER_QUESTION, max_tokens=8,
                                             tools=[openai.pydantic_function_tool(GetWeather)])
    error = refused.value.body
    assert error["param"] == "tools" and "no expert of policy local supports `tools`" in error["message"]


def test_lm_eval_scores_a_local_task_through_coe(tmp_path):
    """lm-eval's local-chat-completions client on a task over local JSON, against coe's app served
    by uvicorn (scripted experts: the client, the task and its scoring are under test here; the
    real-model comparison is evals/client_lm_eval.py's report)."""
    pytest.importorskip("lm_eval", reason="the clients extra is not installed")
    from core.catalog import load_catalog
    from evals.benchmarks import benchmark_items, get_benchmark
    from evals.client_lm_eval import run_lm_eval
    from tests.fakes import KeywordRouter, ScriptedBackend

    pipeline = Pipeline(load_catalog(), ScriptedBackend(), {"keyword": KeywordRouter()}, "keyword")
    server, url = serve(pipeline)
    benchmark = get_benchmark("arc_challenge")
    items = benchmark_items(benchmark)[:8]
    try:
        accuracy, texts, command = run_lm_eval(url, "coe", items, benchmark.kind, benchmark.max_tokens, 4, tmp_path)
    finally:
        server.should_exit = True
        pipeline.close()
    from core.prompts import eval_prompt

    # The scripted expert echoes the prompt: lm-eval sent exactly the prompt `coe eval run` sends.
    assert texts == {i.id: f"smollm2-135m: {eval_prompt(i, benchmark.kind)}" for i in items}
    assert accuracy == 0.0 and command.startswith("lm_eval --model local-chat-completions")
