"""Experts from anywhere in the catalog (no model is loaded here): `path` weights under the
catalog's roots, `remote` endpoints, prices (core/costs.py) and context lengths, and the
composite backend that runs a mixed catalog."""

import json
import struct
import textwrap
from pathlib import Path

import pytest

from core.catalog import Catalog, load_catalog
from core.costs import derived_prices, request_cost
from core.errors import ConfigError, WeightsMissingError
from experts.weights import DEFAULT_CONTEXT_LENGTH, context_length, residence, weights_problem


def write_catalog(folder: Path, body: str, default: str, extra: str = "") -> Path:
    path = folder / "catalog.yaml"
    path.write_text(f"default_expert: {default}\n{extra}experts:\n" + textwrap.dedent(body))
    return path


def fake_model_folder(folder: Path, tensors: dict[str, list[int]], config: dict | None = None, tokenizer=True) -> Path:
    """A model folder whose safetensors header is real (tensor data is never read here)."""
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    (folder / "config.json").write_text(json.dumps(config or {"max_position_embeddings": 4096}))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


PATH_BASE = """
  - name: mine
    kind: base
    weights: {source: path, path: models/mine}
    description: my own model
"""
REMOTE = """
  - name: far
    kind: base
    weights: {source: remote, base_url: "http://127.0.0.1:9/v1", model: m, api_key_env: COE_TEST_FAR_KEY}
    context_length: 32768
    prices: {input: 0.5, output: 1.5}
    description: a hosted model
"""


def test_path_expert_resolves_against_the_catalog_folder_and_reads_its_sizes(tmp_path):
    fake_model_folder(tmp_path / "models" / "mine", {"a": [10, 20], "b": [5]}, {"max_position_embeddings": 4096})
    catalog = load_catalog(write_catalog(tmp_path, PATH_BASE, "mine"))
    mine = catalog.get("mine")
    assert mine.weights.path == (tmp_path / "models" / "mine").resolve()
    assert catalog.roots == [tmp_path.resolve()]
    assert mine.params == 205 and mine.size_bytes == (tmp_path / "models/mine/model.safetensors").stat().st_size
    assert {"params", "size_bytes", "prices"} <= mine.derived
    assert weights_problem(catalog, mine) is None and residence(catalog, mine) == ("disk", str(mine.weights.path))
    assert context_length(catalog, mine) == 4096  # max_position_embeddings of its config


def test_a_path_outside_the_roots_fails_at_start_up_naming_the_expert_and_the_path(tmp_path):
    outside = fake_model_folder(tmp_path / "elsewhere", {"a": [2]})
    inside = tmp_path / "catalogs"
    inside.mkdir()
    body = PATH_BASE.replace("models/mine", str(outside))
    with pytest.raises(ConfigError, match=rf"expert 'mine': weights path {outside} is outside the catalog's roots"):
        load_catalog(write_catalog(inside, body, "mine"))
    with pytest.raises(ConfigError, match="outside the catalog's roots"):  # a relative path that climbs out
        load_catalog(write_catalog(inside, PATH_BASE.replace("models/mine", "../elsewhere"), "mine"))
    (inside / "link").symlink_to(outside)  # a link inside a root that points out of it
    with pytest.raises(ConfigError, match="outside the catalog's roots"):
        load_catalog(write_catalog(inside, PATH_BASE.replace("models/mine", "link"), "mine"))
    # Named as a root, the same folder is fine.
    catalog = load_catalog(write_catalog(inside, body, "mine", extra="roots: [../elsewhere]\n"))
    assert catalog.roots == [outside.resolve()] and catalog.get("mine").params == 2


def test_a_missing_or_incomplete_folder_is_one_clear_problem_of_that_expert_only(tmp_path):
    from experts.weights import base_model_dir

    fake_model_folder(tmp_path / "models" / "mine", {"a": [4]})
    fake_model_folder(tmp_path / "models" / "half", {"a": [4]}, tokenizer=False)
    fake_model_folder(tmp_path / "models" / "junk", {"a": [4]})
    (tmp_path / "models" / "junk" / "model.safetensors").write_bytes(b"not safetensors at all")
    body = PATH_BASE + "".join(PATH_BASE.replace("mine", name) for name in ("gone", "half", "junk"))
    catalog = load_catalog(write_catalog(tmp_path, body, "mine"))
    assert "expert 'junk'" in weights_problem(catalog, catalog.get("junk")) and "unreadable" in weights_problem(
        catalog, catalog.get("junk"))
    gone = catalog.get("gone")
    assert weights_problem(catalog, gone) == f"expert 'gone': weights path {tmp_path.resolve()}/models/gone does not exist"
    assert "expert 'half'" in weights_problem(catalog, catalog.get("half")) and "tokenizer" in weights_problem(
        catalog, catalog.get("half"))
    with pytest.raises(WeightsMissingError, match="expert 'gone'.*does not exist"):
        base_model_dir(gone)
    assert residence(catalog, gone)[0] == "missing"
    assert weights_problem(catalog, catalog.get("mine")) is None  # the others are unaffected


def test_a_gguf_file_needs_its_params_and_a_lora_can_come_from_a_folder(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(100))
    body = """
      - {name: g, kind: base, weights: {source: path, path: m.gguf}, description: d}
    """
    with pytest.raises(ConfigError, match="expert 'g': set params"):
        load_catalog(write_catalog(tmp_path, body, "g"))
    fake_model_folder(tmp_path / "adapter", {"lora_A": [8, 64], "lora_B": [64, 8]})
    (tmp_path / "adapter" / "model.safetensors").rename(tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    body = """
      - {name: g, kind: base, weights: {source: path, path: m.gguf}, params: 1000000000, description: d}
      - {name: g-lora, kind: lora, base: g, weights: {source: path, path: adapter}, description: d}
    """
    catalog = load_catalog(write_catalog(tmp_path, body, "g"))
    lora = catalog.get("g-lora")
    assert catalog.adapter_dir(lora) == (tmp_path / "adapter").resolve()
    assert lora.params == 1024 and weights_problem(catalog, lora) is None
    assert catalog.get("g").size_bytes == 104  # the file's size
    # Active parameters of a LoRA expert: its adapter plus its base.
    assert lora.prices == derived_prices(1_000_000_000 + 1024)


def test_remote_expert_fields_and_their_errors(tmp_path, monkeypatch):
    catalog = load_catalog(write_catalog(tmp_path, REMOTE, "far"))
    far = catalog.get("far")
    assert far.is_remote and far.weights.max_concurrency == 16 and far.weights.timeout_seconds == 60
    assert context_length(catalog, far) == 32768
    assert request_cost(far, 1_000_000, 2_000_000) == pytest.approx(0.5 + 3.0)
    monkeypatch.delenv("COE_TEST_FAR_KEY", raising=False)
    assert weights_problem(catalog, far) == "expert 'far': its API key variable COE_TEST_FAR_KEY is not set"
    monkeypatch.setenv("COE_TEST_FAR_KEY", "sk-test")
    assert weights_problem(catalog, far) is None
    assert residence(catalog, far) == ("remote", "m at http://127.0.0.1:9/v1")
    for broken, message in [
        (REMOTE.replace("    context_length: 32768\n", ""), "remote expert 'far' needs context_length"),
        (REMOTE.replace("    prices: {input: 0.5, output: 1.5}\n", ""), "needs prices"),
        (REMOTE.replace("api_key_env: COE_TEST_FAR_KEY", "api_key: sk-secret"), "never write an API key in the catalog"),
        (REMOTE.replace('"http://127.0.0.1:9/v1"', "ftp://x"), "not an http"),
        (REMOTE.replace("model: m,", "model: m, context_length: 5,"), "belong to the expert"),
        (REMOTE.replace("model: m,", "model: m, max_concurrency: 0,"), "max_concurrency"),
        (REMOTE.replace("model: m,", "model: m, timout_seconds: 5,"), "timout_seconds"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_catalog(write_catalog(tmp_path, broken, "far"))
    lora_on_remote = REMOTE + "  - {name: l, kind: lora, base: far, weights: {source: adapter, path: l}, " \
                              "size_bytes: 1, params: 1, description: d}\n"
    with pytest.raises(ConfigError, match="LoRA expert 'l': its base 'far' has no local weights"):
        load_catalog(write_catalog(tmp_path, lora_on_remote, "far"))
    # The secret never reaches the catalog: only the variable's name is in it.
    assert "sk-test" not in catalog.model_dump_json()


def test_remote_experts_need_no_sizes_and_may_derive_prices_from_params(tmp_path):
    body = REMOTE.replace("prices: {input: 0.5, output: 1.5}", "params: 8000000000")
    far = load_catalog(write_catalog(tmp_path, body, "far")).get("far")
    assert far.size_bytes is None and far.prices == derived_prices(8_000_000_000) and "prices" in far.derived
    assert far.prices.input == pytest.approx(0.16) and far.prices.output == pytest.approx(0.48)


def test_cost_is_one_formula_over_catalog_prices(catalog):
    base, math = catalog.get("smollm2-135m"), catalog.get("smollm2-math")
    assert base.prices == derived_prices(134515008) and math.prices == derived_prices(134515008 + 2442240)
    assert request_cost(base, 0, 0) == 0.0
    cost = request_cost(math, 1000, 100)
    assert cost == pytest.approx((1000 * math.prices.input + 100 * math.prices.output) / 1e6)
    assert request_cost(math, 1000, 100) > request_cost(base, 1000, 100) > 0  # an adapter adds active parameters
    raw = catalog.get("smollm2-135m").model_dump() | {"prices": {"input": 1.0, "output": 2.0}}
    priced = Catalog.model_validate({"experts": [raw], "default_expert": "smollm2-135m"}).get("smollm2-135m")
    assert "prices" not in priced.derived
    assert request_cost(priced, 500_000, 250_000) == pytest.approx(0.5 + 0.5)


def test_context_length_of_the_embedded_experts_and_the_default(catalog, tmp_path):
    assert context_length(catalog, catalog.get("smollm2-135m")) == 8192  # SmolLM2's max_position_embeddings
    assert context_length(catalog, catalog.get("smollm2-math")) == 8192  # a LoRA expert takes its base's
    fake_model_folder(tmp_path / "models" / "mine", {"a": [4]}, config={"model_type": "x"})
    plain = load_catalog(write_catalog(tmp_path, PATH_BASE, "mine"))
    assert context_length(plain, plain.get("mine")) == DEFAULT_CONTEXT_LENGTH == 2048
    set_in_catalog = load_catalog(write_catalog(tmp_path, PATH_BASE + "    context_length: 1024\n", "mine"))
    assert context_length(set_in_catalog, set_in_catalog.get("mine")) == 1024


def test_a_mixed_catalog_runs_each_expert_on_its_backend(tmp_path, monkeypatch):
    """Recorded experts on the replay backend, a missing local model left out with its reason,
    one composite backend over them (no model loaded; the remote backend is covered by
    test_remote_backend.py)."""
    import asyncio

    from core.types import GenerationParams, GenerationRequest, Message
    from evals.replay import Trace
    from experts.backends import build_backend

    body = """
  - {name: rec, kind: base, weights: {source: recorded, trace: t, model: m1}, size_bytes: 1000, params: 100, description: d}
  - {name: gone, kind: base, weights: {source: path, path: nothing-here}, description: d}
""" + REMOTE
    catalog = load_catalog(write_catalog(tmp_path, body, "rec"))
    import numpy as np

    trace = Trace(models=["m1"], letters=np.array([["B"]], dtype=object), row_of_id={"q1": 0}, row_of_text={})
    monkeypatch.setenv("COE_TEST_FAR_KEY", "sk-test")
    backend = build_backend("hf", catalog, traces={"t": trace})
    assert backend.runs_on("rec") == "replay" and backend.runs_on("far") == "remote"
    assert set(backend.unavailable) == {"gone"} and "does not exist" in backend.unavailable["gone"]
    with pytest.raises(WeightsMissingError, match="expert 'gone'"):
        backend.load("gone")
    ask = GenerationRequest(expert="rec", messages=[Message(role="user", content="?")], params=GenerationParams(),
                            query_id="q1", stream=True)
    assert backend.generate([ask])[0].text == "The answer is (B)."

    async def streamed():
        return [p async for p in backend.astream(ask)]  # replay has no astream: the composite gives one

    pieces = asyncio.run(streamed())
    assert pieces[0].text == "The answer is (B)." and pieces[-1].answer.expert == "rec"
    assert backend.resident()["far"] == "remote" and backend.load("far") == 0.0
    assert backend.context_length("far") == 32768
    assert backend.pool is None  # no hf expert here: no local backend, no pool
    backend.close()

    # With replay as the local backend, its pool plans over every expert and holds its own.
    backend = build_backend("replay", catalog, traces={"t": trace})
    assert backend.name == "remote+replay" and "far" not in backend.pool._pool
    with backend.pool.announce(["far", "rec"]), backend.pool.pinned(["far", "rec"]):
        assert backend.pool.state().residence == {"rec": "device", "far": "remote"}
    assert backend.pool.ensure("far") == 0.0 and backend.pool.stats().loads == 1
    backend.close()
