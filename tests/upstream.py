"""A small OpenAI-compatible server for the status cases a real model server is not asked to
produce: the model name picks the behaviour. Runs in a thread of the test process (`Upstream`)
or as its own process (`python -m tests.upstream PORT`, to be killed mid-stream).

models: `ok` (answers "one two three ..."), `capable` (what a server with tools, structured
output, logprobs and n answers: a call of the first allowed tool with {"city": "Paris"}, a JSON
object {"name": "Ann", "age": 30} under a response_format, a logprob per word, n choices; its
streamed tool call comes in two argument pieces; also on /v1/completions), `busy` (429), `broken` (500), `bad` (400 whose
message echoes the request's Authorization header, as a careless upstream might), `hang` (answers
after a minute), `slow` (one word every 0.2 s when streamed; 0.3 s per answer otherwise).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
MODELS = ["ok", "busy", "broken", "bad", "hang", "slow", "capable"]
CALL_ARGUMENTS = '{"city": "Paris"}'
JSON_ANSWER = '{"name": "Ann", "age": 30}'


def build_app(state: dict) -> FastAPI:
    """`state` records what the server saw: authorization headers, client ports, peak concurrency."""
    app = FastAPI()
    state.update(authorizations=[], ports=[], in_flight=0, peak=0)

    @app.get("/v1/models")
    async def models(request: Request):
        state["authorizations"].append(request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"} for m in MODELS]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state["authorizations"].append(request.headers.get("authorization"))
        state["ports"].append(request.client.port)
        model, n = body["model"], min(body.get("max_tokens", 5), len(WORDS))
        state.setdefault("bodies", []).append(body)
        if model == "capable":
            return _capable(body)
        if model == "busy":
            return JSONResponse({"error": {"message": "rate limited, slow down", "type": "rate_limit"}}, status_code=429)
        if model == "broken":
            return JSONResponse({"error": {"message": "internal failure", "type": "server_error"}}, status_code=500)
        if model == "bad":
            echoed = request.headers.get("authorization")
            return JSONResponse({"error": {"message": f"bad request from {echoed}", "type": "invalid_request"}},
                                status_code=400)
        if model == "hang":
            await asyncio.sleep(60)
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        try:
            if body.get("stream"):
                return StreamingResponse(_stream(model, n, state), media_type="text/event-stream")
            if model == "slow":
                await asyncio.sleep(0.3)
        finally:
            if not body.get("stream"):
                state["in_flight"] -= 1
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(WORDS[:n])},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state.setdefault("bodies", []).append(body)
        words = WORDS[: body.get("max_tokens", 16)]
        logprobs = None
        if body.get("logprobs") is not None:
            logprobs = {"tokens": [" " + w for w in words], "token_logprobs": [-0.5] * len(words),
                        "top_logprobs": [{" " + w: -0.5} for w in words], "text_offset": list(range(len(words)))}
        return {"id": "c2", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": " " + " ".join(words), "finish_reason": "length", "logprobs": logprobs}],
                "usage": {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}}

    return app


def _tool_name(body: dict) -> str:
    choice = body.get("tool_choice")
    return choice["function"]["name"] if isinstance(choice, dict) else body["tools"][0]["function"]["name"]


def _capable(body: dict):
    """The `capable` model's answer (module docstring)."""
    calls = body.get("tools") and body.get("tool_choice") != "none"
    content = JSON_ANSWER if (body.get("response_format") or {}).get("type", "text") != "text" else "one two three"
    words = content.split(" ")
    logprobs = {"content": [{"token": w, "logprob": -0.25, "bytes": list(w.encode()),
                             "top_logprobs": [{"token": w, "logprob": -0.25, "bytes": list(w.encode())}]} for w in words]}
    if body.get("stream"):
        return StreamingResponse(_capable_stream(body, bool(calls), content), media_type="text/event-stream")
    message = {"role": "assistant", "content": None if calls else content}
    if calls:
        message["tool_calls"] = [{"id": "call_up1", "type": "function",
                                  "function": {"name": _tool_name(body), "arguments": CALL_ARGUMENTS}}]
    choices = [{"index": i, "message": message, "finish_reason": "tool_calls" if calls else "stop",
                "logprobs": logprobs if body.get("logprobs") else None} for i in range(body.get("n", 1))]
    return {"id": "c3", "object": "chat.completion", "created": 0, "model": "capable", "choices": choices,
            "usage": {"prompt_tokens": 11, "completion_tokens": 3 * len(choices), "total_tokens": 11 + 3 * len(choices)}}


async def _capable_stream(body: dict, calls: bool, content: str):
    def event(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": "c3", "object": "chat.completion.chunk", "created": 0, "model": "capable",
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    yield event({"role": "assistant", "content": ""})
    if calls:
        half = len(CALL_ARGUMENTS) // 2
        yield event({"tool_calls": [{"index": 0, "id": "call_up1", "type": "function",
                                     "function": {"name": _tool_name(body), "arguments": CALL_ARGUMENTS[:half]}}]})
        yield event({"tool_calls": [{"index": 0, "function": {"arguments": CALL_ARGUMENTS[half:]}}]})
        yield event({}, "tool_calls")
    else:
        for i, word in enumerate(content.split(" ")):
            yield event({"content": word if i == 0 else " " + word})
        yield event({}, "stop")
    usage = {"id": "c3", "object": "chat.completion.chunk", "created": 0, "model": "capable", "choices": [],
             "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}
    yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"


async def _stream(model: str, n: int, state: dict):
    try:
        for i, word in enumerate(WORDS[:n]):
            if model == "slow":
                await asyncio.sleep(0.2)
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                                  "finish_reason": "length" if i == n - 1 else None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        usage = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                 "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}
        yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
    finally:
        state["in_flight"] -= 1


class Upstream:
    """The app on 127.0.0.1:port in a background thread of this process."""

    def __init__(self, port: int):
        import uvicorn

        self.state: dict = {}
        self.url = f"http://127.0.0.1:{port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.state), host="127.0.0.1", port=port,
                                                    log_level="warning", timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Upstream:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test upstream did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = self.server.force_exit = True  # a hanging request must not hold it
        self.thread.join(timeout=10)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(build_app({}), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
