"""The path of one chat request, traced: which project files it runs code in, and that it goes
down the layers once (ingress -> engine -> router and backend), never back up to the ingress."""

import sys
import threading
from pathlib import Path

from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
# The files one non-streamed chat request runs code in (issue 18 asked for <= 7; see the note in
# README's layout section for why one job per module puts it here): the ingress, its OpenAI shapes
# and its keys; the engine, its planner and retry loop; the router's protocol, the kNN router and
# the embedder; the backend's protocol, the transformers backend and its pool; the shared types,
# catalog, cost and tracing spans; the policy-name rule (model name -> policy or expert).
EXPECTED = {
    "deploy/server.py", "deploy/openai_api.py", "deploy/keys.py",
    "orchestrator/pipeline.py", "orchestrator/planner.py", "orchestrator/fallback.py", "orchestrator/policies.py",
    "routers/base.py", "routers/knn.py", "routers/embedder.py",
    "experts/backends/base.py", "experts/backends/hf.py", "experts/pool.py",
    "core/types.py", "core/catalog.py", "core/costs.py", "core/tracing.py",
}
# A decorator's wrapper (tracing.traced) calls the function it wraps: a pass-through, not a call up.
DECORATORS = {"core/tracing.py"}
LAYER = {"deploy": 3, "orchestrator": 2, "routers": 1, "experts": 1, "core": 0}


def test_one_chat_request_goes_down_the_layers_through_a_known_set_of_files(hf_backend):
    from core.config import CoeConfig
    from deploy.server import LocalPipelineClient, build_api
    from orchestrator.pipeline import Pipeline

    calls: list[str] = []
    upward: list[str] = []  # code called by code of a lower layer
    recording = threading.Event()

    def project_file(frame) -> str | None:
        path = frame.f_code.co_filename
        if path.startswith(str(ROOT)) and "/.venv/" not in path and "/tests/" not in path:
            return str(Path(path).relative_to(ROOT))
        return None

    def profile(frame, event, arg):
        if event != "call" or not recording.is_set():
            return
        here = project_file(frame)
        if here is None:
            return
        calls.append(here)
        caller = frame.f_back
        while caller is not None:  # the nearest project frame that called this one, in this thread
            below = project_file(caller)
            if below is not None and not (below in DECORATORS and caller.f_code.co_name in ("run", "run_async")):
                if LAYER[below.split("/")[0]] < LAYER[here.split("/")[0]]:
                    upward.append(f"{below} -> {here}")
                break
            caller = caller.f_back

    threading.setprofile(profile)  # every thread the engine starts from here on
    sys.setprofile(profile)
    try:
        pipeline = Pipeline.from_config(CoeConfig(), backend=hf_backend)
        client = TestClient(build_api(LocalPipelineClient(pipeline)))
        body = {"model": "coe", "messages": [{"role": "user", "content": "What is 17 * 23?"}], "max_tokens": 4}
        assert client.post("/v1/chat/completions", json=body).status_code == 200  # warm: threads started, models in
        recording.set()
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        recording.clear()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        pipeline.close()
    assert set(calls) == EXPECTED
    assert upward == []
