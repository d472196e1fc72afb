"""The vLLM backend on a real engine: SmolLM2-135M-Instruct and the committed LoRA experts.

One engine (float32) serves the whole session; `vllm_backend` skips where vLLM is not installed,
and test_environment.py fails where the install should have brought it.
"""

import asyncio
import dataclasses
import time

import pytest

from core.errors import AdapterError, PromptTooLongError
from tests.test_backend_hf import req

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence."]
QUESTION = "Which of the following is a mammal?\n\nA. Shark\nB. Dolphin\nC. Trout\nD. Octopus"
LORAS = ["smollm2-science", "smollm2-medicine", "smollm2-logic", "smollm2-math"]


def test_greedy_matches_transformers(vllm_backend, hf_backend):
    """Same converted weights, same prompts, both in float32: the same greedy tokens. A dropped tied
    embedding (vLLM then emits token 0 forever) or a different prompt template fails here."""
    requests = [req("smollm2-135m", p, max_tokens=8) for p in PROMPTS] + [req("smollm2-science", QUESTION, max_tokens=8)]
    ours, reference = vllm_backend.generate(requests), hf_backend.generate(requests)
    assert [a.text for a in ours] == [a.text for a in reference]
    assert [(a.prompt_tokens, a.completion_tokens) for a in ours] == [(a.prompt_tokens, a.completion_tokens) for a in reference]


def test_mixed_lora_batch_matches_each_expert_alone(vllm_backend):
    experts = ["smollm2-135m", *LORAS]
    mixed = vllm_backend.generate([req(e, QUESTION) for e in experts])
    alone = [vllm_backend.generate([req(e, QUESTION)])[0] for e in experts]
    assert [a.text for a in mixed] == [a.text for a in alone]
    assert [a.expert for a in mixed] == experts
    base = mixed[0].text
    assert sum(a.text != base for a in mixed[1:]) >= 3, "adapters should change the output"
    assert set(vllm_backend.resident()) >= set(experts)


def test_max_tokens_stop_strings_and_token_counts(vllm_backend):
    long, stopped, plain = vllm_backend.generate([
        req("smollm2-135m", "Write a long story about a dragon.", max_tokens=5),
        req("smollm2-135m", "What is the capital of France?", stop=["Paris"]),
        req("smollm2-135m", "What is the capital of France?"),
    ])
    assert long.completion_tokens == 5 and long.finish_reason == "length"
    assert "Paris" in plain.text
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"
    assert plain.text.startswith(stopped.text) and stopped.completion_tokens < plain.completion_tokens
    assert long.prompt_tokens > 5


def test_sampling_is_reproducible_with_a_seed(vllm_backend):
    prompt = "Name a color."
    a, b, _ = vllm_backend.generate([req("smollm2-135m", prompt, temperature=1.0, seed=7, max_tokens=8)] * 2
                                    + [req("smollm2-math", "What is 2 + 2?")])
    [c] = vllm_backend.generate([req("smollm2-135m", prompt, temperature=1.0, seed=7, max_tokens=8)])
    assert a.text == b.text == c.text
    samples = vllm_backend.generate([req("smollm2-135m", prompt, temperature=1.0, seed=s, max_tokens=8) for s in range(5)])
    assert len({s.text for s in samples}) > 1


def test_concurrent_requests_share_one_engine_and_a_bad_adapter_fails_alone(vllm_backend):
    vllm_backend.load("smollm2-135m")
    engine = vllm_backend._engines["smollm2-135m"]
    experts = [*LORAS, "smollm2-rank64", "smollm2-corrupt", "smollm2-missing", "smollm2-135m"]

    async def all_at_once():
        return await asyncio.gather(*(vllm_backend.agenerate(req(e, QUESTION)) for e in experts),
                                    return_exceptions=True)

    results = dict(zip(experts, asyncio.run(all_at_once())))
    assert "max_lora_rank" in str(results["smollm2-rank64"]) and isinstance(results["smollm2-rank64"], AdapterError)
    assert isinstance(results["smollm2-corrupt"], AdapterError)
    assert "missing" in str(results["smollm2-missing"]) and isinstance(results["smollm2-missing"], AdapterError)
    good = [results[e] for e in [*LORAS, "smollm2-135m"]]
    assert all(not isinstance(r, BaseException) and r.text for r in good), good
    assert vllm_backend._engines == {"smollm2-135m": engine}  # one engine, still the same one
    [after] = vllm_backend.generate([req("smollm2-science", QUESTION)])  # and it keeps serving
    assert after.text == results["smollm2-science"].text


def test_prompt_too_long_is_a_400_that_names_the_limit(vllm_backend):
    with pytest.raises(PromptTooLongError) as caught:
        vllm_backend.generate([req("smollm2-135m", "word " * 2000)])
    assert caught.value.status_code == 400 and "at most 1023" in str(caught.value)
    assert vllm_backend.generate([req("smollm2-135m", "Hi")])[0].text


def test_streaming_yields_text_as_it_comes(vllm_backend):
    request = req("smollm2-135m", PROMPTS[1], max_tokens=24)
    pieces = list(vllm_backend.stream(request))

    async def collect(streamed: bool):
        return [piece async for piece in vllm_backend.astream(dataclasses.replace(request, stream=streamed))]

    [whole] = vllm_backend.generate([request])
    [one_piece] = asyncio.run(collect(False))  # not streamed: the answer at the end
    assert one_piece.answer == whole
    for streamed in (pieces, asyncio.run(collect(True))):
        assert len(streamed) > 5  # token by token, not one block at the end
        assert all(p.answer is None and p.text for p in streamed[:-1])
        assert streamed[-1].text == "" and streamed[-1].answer == whole
        assert "".join(p.text for p in streamed).strip() == whole.text


def test_streamed_stop_strings_are_cut(vllm_backend):
    request = req("smollm2-135m", "What is the capital of France?", stop=["Paris"], max_tokens=24)
    pieces = list(vllm_backend.stream(request))
    assert "Paris" not in "".join(p.text for p in pieces) and pieces[-1].answer.finish_reason == "stop"


def test_a_client_that_goes_away_aborts_its_request(vllm_backend):
    story = req("smollm2-135m", "Write a very long story about a dragon.", max_tokens=900)

    async def leave_early():
        stream = vllm_backend.astream(dataclasses.replace(story, stream=True))
        async for _ in stream:
            break
        await stream.aclose()  # a streaming client disconnects
        plain = vllm_backend.stream(story)
        next(plain)
        plain.close()  # the same from a plain thread
        task = asyncio.ensure_future(vllm_backend.agenerate(story))
        # The two that left are aborted and the awaited one reaches the engine: one left running.
        await until(lambda: vllm_backend.unfinished_requests() == 1, "only the awaited request to run")
        task.cancel()  # a waiting client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: vllm_backend.unfinished_requests() == 0, "no request to run after their clients left")

    async def until(condition, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"waited {timeout} s for {what}: {vllm_backend.unfinished_requests()} unfinished"
            await asyncio.sleep(0.05)

    asyncio.run(leave_early())


@pytest.mark.slow
def test_an_engine_offloaded_through_the_pool_mover_comes_back_with_the_same_answers(vllm_backend):
    """On a CPU an offload is an engine stop and a load an engine start (sleep mode is a no-op
    there): through VLLMMover, as the tiered pool drives it (the only way an engine starts or
    stops), the expert leaves, its engine process exits, it comes back, and answers greedily
    exactly as before."""
    import psutil

    def engine_processes():
        running = []
        for process in psutil.Process().children(recursive=True):
            try:
                if process.status() != psutil.STATUS_ZOMBIE and "EngineCore" in " ".join(process.cmdline()):
                    running.append(process)
            except psutil.Error:  # it exited meanwhile (gone, or a zombie its parent has not reaped yet)
                pass
        return running

    requests = [req("smollm2-math", QUESTION, max_tokens=12), req("smollm2-135m", PROMPTS[0], max_tokens=12)]
    before = vllm_backend.generate(requests)
    assert vllm_backend.resident()["smollm2-135m"] == "device" and engine_processes()
    starts = vllm_backend.engine_starts["smollm2-135m"]
    running = {p.pid for p in engine_processes()}  # this backend's, and the session's vLLM server's (conftest `vllm_server`)
    vllm_backend.offload("smollm2-135m")  # the pool's device -> host move: no host tier on a CPU, the engine stops
    resident = vllm_backend.resident()
    assert resident["smollm2-135m"] == resident["smollm2-math"] == "disk" and vllm_backend._engines == {}
    deadline = time.monotonic() + 60
    while running <= {p.pid for p in engine_processes()}:  # this backend's engine process exits
        assert time.monotonic() < deadline, engine_processes()
        time.sleep(0.5)
    vllm_backend.load("smollm2-math")  # the pool's moves up: the engine starts, the adapter is added
    resident = vllm_backend.resident()
    assert resident["smollm2-135m"] == resident["smollm2-math"] == "device"
    assert vllm_backend.engine_starts["smollm2-135m"] == starts + 1
    after = vllm_backend.generate(requests)
    assert [a.text for a in after] == [b.text for b in before]


RACE = """
import threading
from experts.backends.vllm import engine_classes
barrier, errors = threading.Barrier(2), []
def start():
    barrier.wait()
    try:
        engine_classes()
    except ImportError as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=start) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
"""


def test_two_engines_starting_at_once_both_import_the_engine_classes():
    """The pool starts a full copy on its own thread while the first engine starts: unguarded, one
    of two threads importing transformers at once failed with "cannot import name 'AutoTokenizer'"
    in two runs of three (fresh processes, as each run's first engines are)."""
    pytest.importorskip("vllm", reason="the vLLM engine is not installed")
    import subprocess
    import sys

    from evals.provenance import REPO

    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", RACE], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == "[]"
