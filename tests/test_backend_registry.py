"""Backend choice and the micro-batching that gives batch backends `agenerate` (no model, milliseconds)."""

import asyncio
import time

import pytest

from core.config import CoeConfig
from core.errors import ConfigError, UnknownNameError
from core.types import ExpertAnswer, GenerationParams, GenerationRequest, Message
from experts import backends
from experts.backends.base import MicroBatching


def test_auto_is_vllm_where_installed_and_transformers_elsewhere(monkeypatch):
    assert CoeConfig().backend.name == "auto"
    assert backends.resolve_backend_name("auto") == ("vllm" if backends.vllm_installed() else "hf")
    monkeypatch.setattr(backends, "vllm_installed", lambda: False)
    assert backends.resolve_backend_name("auto") == "hf"
    assert backends.resolve_backend_name("vllm") == "vllm"  # named explicitly: no fallback
    with pytest.raises(UnknownNameError, match="auto"):
        backends.resolve_backend_name("tgi")


def test_an_option_the_backend_lacks_is_one_clear_error(catalog):
    with pytest.raises(ConfigError, match="backend 'hf' has no option max_loras"):
        backends.build_backend("hf", catalog, max_loras=4)


class SlowBatchBackend(MicroBatching):
    """Runs each batch in 0.2 s and records what it was given."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def generate(self, requests):
        self.batches.append([r.messages[0].content for r in requests])
        time.sleep(0.2)
        return [ExpertAnswer(expert=r.expert, text=r.messages[0].content.upper()) for r in requests]


def ask(text):
    return GenerationRequest(expert="e", messages=[Message(role="user", content=text)], params=GenerationParams())


def test_requests_that_arrive_during_a_batch_form_the_next_batch():
    backend = SlowBatchBackend()

    async def scenario():
        first = asyncio.ensure_future(backend.agenerate(ask("a")))
        await asyncio.sleep(0.05)  # batch [a] is running
        later = [asyncio.ensure_future(backend.agenerate(ask(t))) for t in "bcde"]
        gone = asyncio.ensure_future(backend.agenerate(ask("x")))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client left before its batch started
        answers = await asyncio.gather(first, *later)
        chunks = [c async for c in backend.astream(ask("f"))]
        return answers, chunks

    answers, chunks = asyncio.run(scenario())
    assert [a.text for a in answers] == ["A", "B", "C", "D", "E"]
    assert backend.batches == [["a"], ["b", "c", "d", "e"], ["f"]]  # never one request at a time, x dropped
    assert [c.text for c in chunks] == ["F", ""] and chunks[-1].answer.text == "F"
