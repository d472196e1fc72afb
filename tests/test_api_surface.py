"""The OpenAI API surface beyond plain chat, in-process (deploy/server.py over a real Pipeline):
tools and the tool role, structured output, n and logprobs go only to experts that have the
capability (here a remote expert on a small OpenAI-compatible server, tests/upstream.py, and
local scripted experts that have none), a 400 naming the field when no expert qualifies;
/v1/completions, /v1/embeddings (the real routing embedder); the allow-list of request fields.
tests/test_api_clients.py runs the same against real servers and real clients."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from core.catalog import Catalog, ExpertSpec, RemoteWeights, load_catalog
from core.types import Capabilities, GenerationParams, Message, ToolSpec
from deploy.server import LocalPipelineClient, build_api
from experts.backends import CompositeBackend
from experts.backends.base import forced_tool_schema, parse_tool_calls, render_prompt
from experts.backends.remote import RemoteBackend
from experts.capabilities import expert_capabilities, template_renders_tools
from orchestrator.pipeline import Pipeline
from tests.conftest import free_port
from tests.fakes import KeywordRouter, ScriptedBackend, ScriptedRouter
from tests.upstream import CALL_ARGUMENTS, JSON_ANSWER, Upstream

LOCAL = ["smollm2-135m", "smollm2-math", "smollm2-science", "smollm2-medicine", "smollm2-logic"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def mixed_catalog(url: str) -> Catalog:
    """The embedded experts plus a remote one with every capability."""
    local = load_catalog()
    capable = ExpertSpec(name="far-capable", kind="base", description="a remote model with tools", context_length=8192,
                         prices={"input": 1.0, "output": 2.0},
                         weights=RemoteWeights(base_url=url, model="capable", tools=True, json=True, logprobs=True, n=True))
    return Catalog(experts=[*local.experts, capable], default_expert=local.default_expert,
                   adapters_root=local.adapters_root, roots=local.roots)


@pytest.fixture(scope="module")
def upstream():
    with Upstream(free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def http(upstream):
    catalog = mixed_catalog(upstream.url)
    backends = {"scripted": ScriptedBackend(), "remote": RemoteBackend(catalog.subset(["far-capable"]))}
    runs_on = {**dict.fromkeys(LOCAL, "scripted"), "far-capable": "remote"}
    backend = CompositeBackend(catalog, backends, runs_on, {}, "scripted")
    # `mixed` ranks a local expert first and the remote one second; a "vote" question asks for
    # three experts and a vote; `keyword` ranks only local experts.
    mixed = ScriptedRouter({"vote question": (("smollm2-math", "far-capable", "smollm2-135m"), 3, "vote")},
                           default=("smollm2-135m", "far-capable"))
    pipeline = Pipeline(catalog, backend, {"mixed": mixed, "keyword": KeywordRouter()}, "mixed")
    yield TestClient(build_api(LocalPipelineClient(pipeline)))
    pipeline.close()


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def ask(content="What is the weather in Paris?", **extra) -> dict:
    return {"model": "coe", "messages": [{"role": "user", "content": content}], **extra}


def last_upstream_body(upstream) -> dict:
    return upstream.state["bodies"][-1]


# -- tools --------------------------------------------------------------------------------------


def test_tools_go_to_an_expert_that_has_them_and_come_back_as_tool_calls(client, upstream):
    reply = client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=[WEATHER], tool_choice="auto")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.function.arguments == CALL_ARGUMENTS
    coe = reply.model_extra["coe"]
    assert coe["answered_by"] == ["far-capable"] and coe["fallback"] is False
    assert [e["name"] for e in coe["experts"]] == ["far-capable"]  # the local expert lacks tools: left out
    assert "smollm2-135m lacks tools" in coe["explanation"]
    sent = last_upstream_body(upstream)
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "auto"

    # The conversation goes on with the call and its result: the tool role reaches the expert.
    messages = [{"role": "user", "content": "Weather in Paris?"}, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    reply = client.chat.completions.create(model="smollm2-135m", messages=messages)
    assert reply.choices[0].message.content == 'smollm2-135m: {"celsius": 21}'  # no tools asked: any expert
    reply = client.chat.completions.create(model="far-capable", messages=messages, tools=[WEATHER])
    assert reply.choices[0].finish_reason == "tool_calls"
    sent = last_upstream_body(upstream)["messages"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather" and sent[1]["role"] == "assistant"
    assert sent[2] == {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": call.id}


def test_a_forced_tool_choice_is_passed_through(client, upstream):
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    reply = client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "Time?"}],
                                           tools=[WEATHER, other], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert reply.choices[0].message.tool_calls[0].function.name == "get_time"
    assert last_upstream_body(upstream)["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}


def test_tool_calls_stream_as_openai_streams_them(client):
    stream = client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                            tools=[WEATHER], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    calls: dict[int, dict] = {}
    for c in chunks:
        for call in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            so_far = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            so_far["name"] += call.function.name or ""
            so_far["arguments"] += call.function.arguments or ""
    assert calls == {0: {"id": "call_up1", "name": "get_weather", "arguments": CALL_ARGUMENTS}}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"] and chunks[-1].usage.completion_tokens == 3


def test_the_openai_clients_tool_helper_parses_the_call(client):
    class GetWeather(BaseModel):
        city: str

    reply = client.chat.completions.parse(model="coe", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                          tools=[openai.pydantic_function_tool(GetWeather, name="get_weather")])
    [call] = reply.choices[0].message.tool_calls
    assert call.function.parsed_arguments == GetWeather(city="Paris")
    # The parsed message goes back into the conversation as it is (the client echoes its parsed fields).
    messages = [{"role": "user", "content": "Weather in Paris?"}, reply.choices[0].message,
                {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    assert client.chat.completions.create(model="coe", messages=messages).choices[0].message.content


# -- structured output, n, logprobs -------------------------------------------------------------


def test_structured_output_with_the_openai_clients_parse_helper(client, upstream):
    class Person(BaseModel):
        name: str
        age: int

    reply = client.chat.completions.parse(model="coe", messages=[{"role": "user", "content": "Ann, 30, as JSON"}],
                                          response_format=Person)
    assert reply.choices[0].message.parsed == Person(name="Ann", age=30)
    sent = last_upstream_body(upstream)["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"]["properties"]["age"] == {"title": "Age", "type": "integer"}
    reply = client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "JSON please"}],
                                           response_format={"type": "json_object"})
    assert json.loads(reply.choices[0].message.content) == json.loads(JSON_ANSWER)


def test_n_choices_and_logprobs(client, upstream):
    reply = client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "Count"}], n=3,
                                           logprobs=True, top_logprobs=1, temperature=0.7)
    assert [c.index for c in reply.choices] == [0, 1, 2] and {c.message.content for c in reply.choices} == {"one two three"}
    assert [t.token for t in reply.choices[2].logprobs.content] == ["one", "two", "three"]
    assert reply.choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.25
    assert reply.usage.completion_tokens == 9
    sent = last_upstream_body(upstream)
    assert (sent["n"], sent["logprobs"], sent["top_logprobs"]) == (3, True, 1)


def test_a_capability_request_is_one_experts_answer(http):
    """A vote over three experts becomes the best capable expert's answer alone (k = 1)."""
    reply = http.post("/v1/chat/completions", json=ask("vote question", logprobs=True)).json()
    assert reply["coe"]["answered_by"] == ["far-capable"] and reply["coe"]["aggregator"] == "passthrough"
    assert "one expert answers (logprobs)" in reply["coe"]["explanation"]
    plain = http.post("/v1/chat/completions", json=ask("vote question")).json()
    assert len(plain["coe"]["answered_by"]) == 3 and plain["coe"]["aggregator"] == "vote"


@pytest.mark.parametrize("field, extra", [
    ("tools", {"tools": [WEATHER]}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("logprobs", {"logprobs": True}),
    ("n", {"n": 2}),
])
def test_a_field_no_expert_supports_is_a_400_naming_it(http, field, extra):
    for model, says in (("coe-keyword", f"no expert of policy keyword supports `{field}`"),
                        ("smollm2-math", f"expert smollm2-math does not support `{field}`")):
        reply = http.post("/v1/chat/completions", json={**ask(**extra), "model": model})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == field and error["code"] == "unsupported_parameter" and says in error["message"]
    streamed = http.post("/v1/chat/completions", json={**ask(stream=True, **extra), "model": "coe-keyword"})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == field


# -- the allow-list and bad input -----------------------------------------------------------------


BAD = {
    "an unknown field": ({"temprature": 0.5}, "temprature"),
    "an unknown field in a message": ({"messages": [{"role": "user", "content": "hi", "mood": "sad"}]}, "messages.0.mood"),
    "an unknown field in a tool": ({"tools": [{**WEATHER, "strictly": True}]}, "tools.0.strictly"),
    "frequency_penalty set": ({"frequency_penalty": 0.5}, "frequency_penalty"),
    "presence_penalty set": ({"presence_penalty": -1}, "presence_penalty"),
    "logit_bias set": ({"logit_bias": {"42": 5}}, "logit_bias"),
    "parallel_tool_calls off": ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
    "functions (the old tools)": ({"functions": [WEATHER["function"]]}, "functions"),
    "audio output": ({"modalities": ["text", "audio"]}, "modalities"),
    "a tool schema that is not JSON Schema": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools"),
    "a response schema that is not JSON Schema": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"properties": 3}}}},
        "response_format"),
    "json_schema without a schema": ({"response_format": {"type": "json_schema"}}, "response_format"),
    "an unknown response_format": ({"response_format": {"type": "yaml"}}, "response_format.type"),
    "tool_choice without tools": ({"tool_choice": "auto"}, "tool_choice"),
    "tool_choice of a tool not given": (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    "tool_choice of the wrong type": ({"tools": [WEATHER], "tool_choice": 7}, "tool_choice"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "top_logprobs out of range": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "n out of range": ({"n": 17}, "n"),
    "n zero": ({"n": 0}, "n"),
    "logprobs of the wrong type": ({"logprobs": "yes"}, "logprobs"),
    "a tool message without its call id": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "21"}]}, "messages.1"),
    "tool_calls on a user message": (
        {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0"),
    "a tool name with spaces": (
        {"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_field_out_of_the_allow_list_or_range_is_a_400_naming_it(http, name):
    extra, param = BAD[name]
    reply = http.post("/v1/chat/completions", json=ask(**extra))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert param.split(".")[0] in error["message"]


def test_the_documented_allow_list_is_what_the_requests_accept():
    from deploy import openai_api as api

    assert set(api.ChatCompletionRequest.model_fields) == {*api.CHAT_FIELDS, *api.CHAT_DEFAULT_ONLY, "coe"}
    assert set(api.CompletionRequest.model_fields) == {*api.COMPLETION_FIELDS, *api.COMPLETION_DEFAULT_ONLY, "coe"}
    assert set(api.EmbeddingRequest.model_fields) == set(api.EMBEDDING_FIELDS)
    assert set(api.DEFAULT_ONLY) == {*api.CHAT_DEFAULT_ONLY, *api.COMPLETION_DEFAULT_ONLY}


def test_spec_fields_at_their_defaults_are_accepted(http):
    defaults = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": None, "store": False, "metadata": None,
                "service_tier": "auto", "user": "ann", "parallel_tool_calls": True, "tools": [WEATHER], "tool_choice": "none"}
    reply = http.post("/v1/chat/completions", json={**ask(), "model": "coe-keyword", **defaults})
    assert reply.status_code == 200, reply.text  # tool_choice none: no tools needed, a local expert answers


# -- /v1/completions ------------------------------------------------------------------------------


def test_completions_take_the_prompt_as_it_is(http, client):
    reply = client.completions.create(model="smollm2-math", prompt="The capital of France is", max_tokens=8)
    assert reply.object == "text_completion" and reply.choices[0].text == "smollm2-math: The capital of France is"
    assert reply.model_extra["coe"]["answered_by"] == ["smollm2-math"]
    batch = client.completions.create(model="coe-keyword", prompt=["a math prompt", "a science prompt"])
    assert [c.text for c in batch.choices] == ["smollm2-math: a math prompt", "smollm2-science: a science prompt"]
    assert [c.index for c in batch.choices] == [0, 1]
    text = "".join(c.choices[0].text for c in client.completions.create(model="coe-keyword", prompt="a logic prompt",
                                                                         stream=True) if c.choices)
    assert text == "smollm2-logic: a logic prompt"
    assert http.post("/v1/completions", json={"model": "coe", "prompt": "hi", "echo": True}).json()["error"]["param"] == "echo"
    assert http.post("/v1/completions", json={"model": "coe", "prompt": "  "}).status_code == 400
    no_logprobs = http.post("/v1/completions", json={"model": "coe-keyword", "prompt": "hi", "logprobs": 1})
    assert no_logprobs.status_code == 400 and no_logprobs.json()["error"]["param"] == "logprobs"


def test_streamed_choices_come_under_their_index(client):
    chunks = list(client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "Count"}], n=2,
                                                 stream=True, temperature=0.5))
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {0: "one two three", 1: "one two three"}
    finishes = sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason)
    assert finishes == [0, 1]


def test_completions_with_logprobs_from_an_expert_that_has_them(client, upstream):
    reply = client.completions.create(model="coe", prompt="Count:", max_tokens=3, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == "one two three" and choice.logprobs.tokens == [" one", " two", " three"]
    assert choice.logprobs.token_logprobs == [-0.5] * 3 and choice.logprobs.top_logprobs[0] == {" one": -0.5}
    sent = last_upstream_body(upstream)
    assert sent["prompt"] == "Count:" and sent["logprobs"] == 1 and "messages" not in sent


# -- /v1/embeddings -------------------------------------------------------------------------------


def test_embeddings_are_the_routing_embedders(client, http):
    from routers.embedder import shared_embedder

    texts = ["What is 17 * 23?", "Which nerve supplies the deltoid?"]
    reply = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    vectors = np.array([d.embedding for d in reply.data])
    assert vectors.shape == (2, 384) and np.allclose(vectors, shared_embedder().embed(texts), atol=1e-6)
    assert reply.usage.prompt_tokens > 0
    one = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts[0]}).json()
    assert one["object"] == "list" and one["data"][0]["index"] == 0 and len(one["data"][0]["embedding"]) == 384
    assert np.isclose(np.linalg.norm(one["data"][0]["embedding"]), 1.0, atol=1e-5)
    assert "all-MiniLM-L6-v2" in [m.id for m in client.models.list().data]
    assert http.post("/v1/embeddings", json={"model": "ada", "input": "x"}).status_code == 404
    assert http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 64}).json()["error"]["param"] == "dimensions"
    assert http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [1, 2]}).status_code == 400
    assert http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x", "extra": 1}).json()["error"]["param"] == "extra"


# -- capabilities and the local tool-call convention ---------------------------------------------


def test_models_show_each_experts_capabilities(http):
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert cards["far-capable"]["coe"]["capabilities"] == {"tools": True, "json_output": True, "logprobs": True, "n": True}
    assert cards["smollm2-math"]["coe"]["capabilities"] == {"tools": False, "json_output": False, "logprobs": False, "n": False}
    assert "coe" not in cards["coe-keyword"]


def test_capabilities_of_the_embedded_and_remote_experts(upstream):
    catalog = mixed_catalog(upstream.url)
    math = catalog.get("smollm2-math")
    # SmolLM2's chat template renders no tools: no tools on either local backend.
    assert expert_capabilities(catalog, math, "vllm") == Capabilities(json_output=True, logprobs=True, n=True)
    assert expert_capabilities(catalog, math, "hf") == Capabilities()
    assert expert_capabilities(catalog, catalog.get("far-capable"), "remote") == Capabilities(
        tools=True, json_output=True, logprobs=True, n=True)


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t | tojson }}{% endfor %}\n"
    "Answer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")


def test_a_local_template_that_renders_tools_gets_them_and_its_calls_are_parsed(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    (tmp_path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    assert template_renders_tools(tmp_path) and not template_renders_tools(tmp_path.parent)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = HERMES_TEMPLATE
    tools = [ToolSpec.model_validate(WEATHER)]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [Message(role="user", content="Weather in Oslo?"), Message(role="assistant", tool_calls=[call]),
                Message(role="tool", tool_call_id="call_1", content="-3")]
    prompt = render_prompt(tokenizer, True, messages, GenerationParams(tools=tools))
    assert '"name": "get_weather"' in prompt.split("<|im_end|>")[0]  # the tools are rendered
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in prompt  # arguments as an object
    assert "Tools:" not in render_prompt(tokenizer, True, messages, GenerationParams(tools=tools, tool_choice="none"))

    text, calls = parse_tool_calls('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
                                   '<tool_call>{"name": "get_time", "arguments": {}}')
    assert text == "Let me look." and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    forced = forced_tool_schema(GenerationParams(tools=tools, tool_choice="required"))
    assert forced["properties"]["name"] == {"const": "get_weather"} and forced["properties"]["arguments"]["required"] == ["city"]


def test_vllm_sampling_parameters_carry_n_logprobs_and_guided_decoding():
    pytest.importorskip("vllm", reason="the vLLM engine is not installed")
    from core.types import JsonSchemaFormat, NamedFunction, NamedToolChoice, ResponseFormat
    from experts.backends.vllm import sampling_params

    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    params = GenerationParams(n=3, logprobs=True, top_logprobs=2, temperature=0.5, max_tokens=64,
                              response_format=ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(schema=schema)))
    sampling = sampling_params(params, room=40, streaming=False)
    assert (sampling.n, sampling.logprobs, sampling.max_tokens) == (3, 2, 40)
    assert sampling.structured_outputs.json == schema
    assert sampling_params(GenerationParams(response_format=ResponseFormat(type="json_object")), 10, True
                           ).structured_outputs.json_object is True
    assert sampling_params(GenerationParams(), 10, True).structured_outputs is None
    assert sampling_params(GenerationParams(logprobs=False), 10, True).logprobs is None
    tools = GenerationParams(tools=[ToolSpec.model_validate(WEATHER)],
                             tool_choice=NamedToolChoice(function=NamedFunction(name="get_weather")))
    forced = sampling_params(tools, 10, False, forced_tool_schema(tools)).structured_outputs
    assert forced.json["properties"]["name"] == {"const": "get_weather"} and forced.disable_any_whitespace
