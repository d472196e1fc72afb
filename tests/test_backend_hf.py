"""The transformers backend on the real SmolLM2-135M-Instruct and its trained LoRA experts."""

from core.types import GenerationParams, GenerationRequest, Message

GREEDY = GenerationParams(max_tokens=12)


def req(expert, text, **params):
    return GenerationRequest(expert=expert, messages=[Message(role="user", content=text)],
                             params=GenerationParams(**{"max_tokens": 12, **params}))


def test_greedy_generation_knows_paris(hf_backend):
    [answer] = hf_backend.generate([req("smollm2-135m", "What is the capital of France?")])
    assert "Paris" in answer.text
    assert answer.prompt_tokens > 5 and 0 < answer.completion_tokens <= 12


def test_max_tokens_and_stop_strings(hf_backend):
    long, stopped = hf_backend.generate([
        req("smollm2-135m", "Write a long story about a dragon.", max_tokens=5),
        req("smollm2-135m", "What is the capital of France?", stop=["Paris"]),
    ])
    assert long.completion_tokens == 5 and long.finish_reason == "length"
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"


def test_sampling_is_reproducible_with_a_seed(hf_backend):
    prompt = "Name a color."
    a, b, other = hf_backend.generate([req("smollm2-135m", prompt, temperature=1.0, seed=7, max_tokens=8)] * 2
                                      + [req("smollm2-135m", "What is the capital of France?")])
    [c] = hf_backend.generate([req("smollm2-135m", prompt, temperature=1.0, seed=7, max_tokens=8)])
    assert a.text == b.text == c.text  # the same seed gives the same sample, whatever shares the batch
    samples = {s.text for s in hf_backend.generate([req("smollm2-135m", prompt, temperature=1.0, seed=s, max_tokens=8)
                                                    for s in range(5)])}
    assert len(samples) > 1  # and it really samples


def test_mixed_lora_batch_matches_each_expert_alone(hf_backend, catalog):
    """One base copy serves every LoRA expert; a mixed batch gives each row its own adapter."""
    question = "Which of the following is a mammal?\n\nA. Shark\nB. Dolphin\nC. Trout\nD. Octopus"
    experts = ["smollm2-135m", "smollm2-science", "smollm2-medicine", "smollm2-logic", "smollm2-math"]
    mixed = hf_backend.generate([req(e, question) for e in experts])
    alone = [hf_backend.generate([req(e, question)])[0] for e in experts]
    assert [a.text for a in mixed] == [a.text for a in alone]
    assert [a.expert for a in mixed] == experts
    assert len({a.text for a in mixed}) >= 3, "adapters should change the output"
    assert set(hf_backend.resident()) >= set(experts)
    assert len(hf_backend._bases) == 1  # one copy of the base for all of them


def test_stream_matches_generate_and_ends_with_the_answer(hf_backend):
    request = req("smollm2-135m", "What is the capital of France?", max_tokens=16)
    [whole] = hf_backend.generate([request])
    pieces = list(hf_backend.stream(request))
    *texts, last = pieces
    assert len(texts) > 2 and all(p.text and p.answer is None for p in texts)  # token by token, not one lump
    assert last.answer == whole
    assert "".join(p.text for p in texts).strip() == whole.text


def test_stream_cuts_at_stop_strings_and_stops_when_closed(hf_backend):
    stopped = list(hf_backend.stream(req("smollm2-135m", "What is the capital of France?", stop=["Paris"], max_tokens=24)))
    assert "Paris" not in "".join(p.text for p in stopped)
    assert stopped[-1].answer.finish_reason == "stop" and "Paris" not in stopped[-1].answer.text
    stream = hf_backend.stream(req("smollm2-135m", "Write a long story about a dragon.", max_tokens=400))
    next(stream)
    stream.close()  # the generation thread ends at the next token, the backend is free again
    [after] = hf_backend.generate([req("smollm2-135m", "What is the capital of France?")])
    assert "Paris" in after.text


def test_stop_scanner_holds_back_partial_stop_strings():
    from experts.backends.base import StopScanner

    scanner = StopScanner(["END"])
    assert scanner.feed("  hello E") == "hello "  # leading space dropped, "E" may start END
    assert scanner.feed("N") == ""
    assert scanner.feed("Dless") == "" and scanner.stopped
    scanner = StopScanner(["END"])
    assert scanner.feed("hi E") == "hi " and scanner.feed("x") == "Ex" and scanner.flush() == ""
