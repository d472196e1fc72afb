"""Shared fixtures: real models and a real Serve app, each started once per test session."""

from __future__ import annotations

import os
import tempfile
import time

import psutil
import pytest

from evals.servers import free_port  # tests import it from here

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# coe's own state (feedback, key usage) goes to a folder of this test session, never the user's.
os.environ.setdefault("COE_STATE_DIR", tempfile.mkdtemp(prefix="coe-state-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

API_KEY = "test-key-123"  # the session's Serve app requires it
VLLM_SERVER_KEY = "sk-vllm-" + os.urandom(8).hex()  # the key of the session's vLLM OpenAI server
VLLM_SERVER_MODEL = "smollm2"  # the name it serves SmolLM2 under


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a dead child its parent has not waited for yet)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_running(processes: list[psutil.Process], within_s: float) -> list[str]:
    """The processes still alive once `within_s` has passed (sooner when none is), as 'pid name'."""
    deadline = time.monotonic() + within_s
    while True:
        running = []
        for p in processes:
            if alive(p):
                try:
                    running.append(f"{p.pid} {p.name()}")
                except psutil.NoSuchProcess:
                    pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


@pytest.fixture(scope="session")
def catalog():
    from core.catalog import load_catalog

    return load_catalog()


@pytest.fixture(scope="session")
def hf_backend(catalog):
    """The real transformers backend on SmolLM2 in float32: exact, batch-independent greedy outputs."""
    from experts.backends.hf import HFBackend

    return HFBackend(catalog, dtype="float32")


@pytest.fixture(scope="session")
def pipeline(hf_backend):
    from core.config import CoeConfig
    from orchestrator.pipeline import Pipeline

    with Pipeline.from_config(CoeConfig(), backend=hf_backend) as pipeline:
        yield pipeline


@pytest.fixture(scope="session")
def serve_url():
    """The real Ray Serve application on localhost, as `coe serve` runs it (ingress, router, one
    expert pool for the SmolLM2 family)."""
    from core.config import CoeConfig
    from deploy.app import start, stop

    # The default backend, as `coe serve` runs it: vLLM where installed (make test), else transformers.
    config = CoeConfig.model_validate({"serve": {"num_cpus": 2, "api_keys": [API_KEY]}})
    url = start(config, host="127.0.0.1", port=free_port())
    yield url
    stop()


@pytest.fixture(scope="session")
def vllm_catalog(catalog, tmp_path_factory):
    """The default pool plus experts whose adapters are broken: missing, too high a rank, corrupt."""
    import json
    import shutil

    from core.catalog import Catalog

    root = tmp_path_factory.mktemp("adapters")
    for spec in catalog.experts:
        if spec.kind == "lora":
            shutil.copytree(catalog.adapter_dir(spec), root / spec.name)  # a copy: links would leave the root
    math_dir = catalog.adapter_dir(catalog.get("smollm2-math"))
    high_rank = root / "smollm2-rank64"
    high_rank.mkdir()
    (high_rank / "adapter_config.json").write_text(json.dumps({**json.loads((math_dir / "adapter_config.json").read_text()), "r": 64}))
    shutil.copy(math_dir / "adapter_model.safetensors", high_rank)
    corrupt = root / "smollm2-corrupt"
    corrupt.mkdir()
    shutil.copy(math_dir / "adapter_config.json", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file" * 100)
    broken = [spec.model_copy(update={"name": name, "weights": spec.weights.model_copy(update={"path": name})})
              for spec in [catalog.get("smollm2-math")] for name in ("smollm2-rank64", "smollm2-corrupt", "smollm2-missing")]
    return Catalog(experts=[*catalog.experts, *broken], default_expert=catalog.default_expert, adapters_root=root)


@pytest.fixture(scope="session")
def vllm_backend(vllm_catalog):
    """One real vLLM engine for the session, in float32 so its greedy outputs match transformers'."""
    pytest.importorskip("vllm", reason="the vLLM engine is not installed (scripts/install.sh installs it)")
    from experts.backends.vllm import VLLMBackend

    # No hot experts' full copies here (tests/test_vllm_pool.py has them): one engine, as these tests assume.
    backend = VLLMBackend(vllm_catalog, dtype="float32", enforce_eager=True, max_num_seqs=16, max_model_len=1024,
                          pool={"hot": {"enabled": False}})
    yield backend
    backend.shutdown()

FAULTY_EXPERT = "smollm2-math"


# The backends the Serve apps of the fault and crash tests run on: transformers in the default
# suite (light replicas that restart in seconds), and vLLM, the default of `coe serve`, in the slow
# tier (each such app starts an engine of its own, ~30 s, beside the session app's).
SERVE_BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.slow)]


def backend_settings(name: str) -> dict:
    if name == "vllm":
        pytest.importorskip("vllm", reason="the vLLM engine is not installed (scripts/install.sh installs it)")
        return {"name": "vllm", "options": {"kv_cache_gib": 0.5, "max_num_seqs": 32}}
    return {"name": "hf", "options": {"max_batch_size": 16}}


@pytest.fixture(scope="session", params=SERVE_BACKENDS)
def faulty_serve_url(serve_url, request):
    """A second application beside the first (same Ray, same port, under /faulty-BACKEND): small
    queues, and smollm2-math failing every call (so every request routed to it shows the retry
    and the fallback). No API key."""
    from ray import serve

    from core.config import CoeConfig
    from deploy.app import build_app

    config = CoeConfig.model_validate({
        "backend": backend_settings(request.param),
        "faults": {"experts": [FAULTY_EXPERT], "rate": 1.0, "seed": 0},
        "resilience": {"cooldown_failures": 1000},  # every request shows retry and fallback
        "serve": {"retry_after_seconds": 2, "admission": {"max_running": 4, "max_waiting": 4},
                  "pools": {"default": {"ray_actor_options": {"num_cpus": 0.25}}}},
    })
    name = f"coe-faulty-{request.param}"
    serve.run(build_app(config), name=name, route_prefix=f"/faulty-{request.param}")
    yield f"{serve_url}/faulty-{request.param}"
    serve.delete(name)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI server over SmolLM2 on a free port, with tool calling, requiring
    VLLM_SERVER_KEY (evals/servers.py, which the remote benchmark starts too)."""
    pytest.importorskip("vllm", reason="the vLLM engine is not installed (scripts/install.sh installs it)")
    from core.catalog import load_catalog
    from evals.servers import vllm_openai_server
    from experts.weights import base_model_dir

    model_dir = base_model_dir(load_catalog().get("smollm2-135m"))
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with vllm_openai_server(model_dir, VLLM_SERVER_MODEL, VLLM_SERVER_KEY, log) as url:
        yield url


# -- test order ----------------------------------------------------------------------------
# Every test must pass in any order: `pytest --test-order reverse` (or `shuffle`, with
# `--test-order-seed N`) runs the collected tests in another order, keeping each module's tests
# together (module- and session-scoped apps start once per module) and the tests that share a
# parametrized module- or session-scoped fixture value together.


def pytest_addoption(parser):
    parser.addoption("--test-order", choices=["as-written", "reverse", "shuffle"], default="as-written",
                     help="run the tests in another order, to show that none depends on another having run")
    parser.addoption("--test-order-seed", type=int, default=0, help="seed of --test-order shuffle")


def _shared_params(item) -> tuple:
    """The values of the module- or session-scoped parametrized fixtures an item uses."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return ()
    defs = item._fixtureinfo.name2fixturedefs
    return tuple(sorted((name, str(value)) for name, value in callspec.params.items()
                        if name in defs and defs[name][-1].scope in ("module", "session")))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    order = config.getoption("--test-order")
    if order == "as-written":
        return
    import random

    rng = random.Random(config.getoption("--test-order-seed"))
    modules: dict[str, dict[tuple, list]] = {}
    for item in items:
        modules.setdefault(item.module.__name__, {}).setdefault(_shared_params(item), []).append(item)
    blocks = [list(groups.values()) for groups in modules.values()]
    if order == "reverse":
        blocks = [[list(reversed(g)) for g in reversed(groups)] for groups in reversed(blocks)]
    else:
        rng.shuffle(blocks)
        for groups in blocks:
            rng.shuffle(groups)
            for group in groups:
                rng.shuffle(group)
    items[:] = [item for groups in blocks for group in groups for item in group]
