"""Routing reloads without a restart: a changed catalog (routing examples) is read again on
POST /v1/admin/reload, and only an admin key may ask (in-process app, real embedder and kNN)."""

from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from core.catalog import DEFAULT_CATALOG
from core.config import CoeConfig
from deploy.keys import KeyGate, KeySpec, KeyStore, key_hash
from deploy.server import LocalPipelineClient, build_api
from orchestrator.pipeline import Pipeline
from tests.fakes import ScriptedBackend

COOKING = ["How long do I boil an egg?", "What temperature bakes bread?", "How do I caramelise onions?",
           "Which knife cuts tomatoes best?", "How much salt goes in pasta water?"]
LAW = ["Can my landlord keep my deposit?", "What is a breach of contract?", "Do I need a will?",
       "How do I contest a parking fine?", "What does a notary do?"]


def write_catalog(path: Path, math_examples: list[str], science_examples: list[str]) -> None:
    catalog = yaml.safe_load(DEFAULT_CATALOG.read_text())
    experts = [e for e in catalog["experts"] if e["name"] in ("smollm2-135m", "smollm2-math", "smollm2-science")]
    for expert in experts:
        expert.pop("examples_file", None)
        expert["examples"] = {"smollm2-math": math_examples, "smollm2-science": science_examples}.get(expert["name"], [])
    path.write_text(yaml.safe_dump({"default_expert": "smollm2-135m", "experts": experts}))


def test_a_changed_catalog_routes_after_a_reload_without_a_restart(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    write_catalog(catalog, COOKING, LAW)
    config = CoeConfig(catalog=catalog, policies={"knn": {"router": "knn", "options": {"neighbours": 3, "margin": 0.0,
                                                                                         "min_similarity": 0.0}}})
    pipeline = Pipeline.from_config(config, backend=ScriptedBackend())
    keys = [KeySpec(name="ops", key_sha256=key_hash("ops-secret-1"), admin=True),
            KeySpec(name="app", key_sha256=key_hash("app-secret-1"))]
    client = TestClient(build_api(LocalPipelineClient(pipeline), gate=KeyGate(keys, KeyStore(keys))))
    ask = {"model": "coe", "messages": [{"role": "user", "content": "How do I poach an egg?"}]}
    ops, app = {"authorization": "Bearer ops-secret-1"}, {"authorization": "Bearer app-secret-1"}
    assert client.post("/v1/route", json=ask, headers=app).json()["ranked"][0]["expert"] == "smollm2-math"
    write_catalog(catalog, LAW, COOKING)  # the experts swap subjects
    assert client.post("/v1/admin/reload", headers=app).status_code == 403
    assert client.post("/v1/route", json=ask, headers=app).json()["ranked"][0]["expert"] == "smollm2-math"
    reply = client.post("/v1/admin/reload", headers=ops)
    assert reply.status_code == 200 and reply.json()["removed"] == [] and reply.json()["restart_needed_for"] == []
    assert client.post("/v1/route", json=ask, headers=app).json()["ranked"][0]["expert"] == "smollm2-science"
    pipeline.close()
