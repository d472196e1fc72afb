"""Backend choice and the micro-batching that gives batch backends `agenerate` (no model, milliseconds)."""

import asyncio
import threading
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


class GatedBatchBackend(MicroBatching):
    """Records each batch it is given; the first batch runs until the test opens the gate."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()

    def generate(self, requests):
        self.batches.append([r.messages[0].content for r in requests])
        if len(self.batches) == 1:
            assert self.gate.wait(timeout=30), "the test never opened the gate"
        return [ExpertAnswer(expert=r.expert, text=r.messages[0].content.upper()) for r in requests]


def ask(text):
    return GenerationRequest(expert="e", messages=[Message(role="user", content=text)], params=GenerationParams())


async def until(condition, timeout: float = 10.0) -> None:
    """Poll until `condition()` holds, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


def test_requests_that_arrive_during_a_batch_form_the_next_batch():
    backend = GatedBatchBackend()

    async def scenario():
        first = asyncio.ensure_future(backend.agenerate(ask("a")))
        await until(lambda: backend.batches == [["a"]])  # batch [a] is running (held at the gate)
        later = [asyncio.ensure_future(backend.agenerate(ask(t))) for t in "bcde"]
        gone = asyncio.ensure_future(backend.agenerate(ask("x")))
        await until(lambda: backend._queue.qsize() == 5)  # all five queued behind the running batch
        gone.cancel()  # its client left before its batch started
        backend.gate.set()
        answers = await asyncio.gather(first, *later)
        chunks = [c async for c in backend.astream(ask("f"))]
        return answers, chunks

    answers, chunks = asyncio.run(scenario())
    assert [a.text for a in answers] == ["A", "B", "C", "D", "E"]
    assert backend.batches == [["a"], ["b", "c", "d", "e"], ["f"]]  # never one request at a time, x dropped
    assert [c.text for c in chunks] == ["F", ""] and chunks[-1].answer.text == "F"
