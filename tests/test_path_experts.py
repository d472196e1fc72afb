"""`path` experts on a real backend: SmolLM2 from a model folder, from a .gguf file (converted
once into the cache) and a LoRA adapter from a folder, all copied under a temporary root, answer
exactly as the embedded base and its math expert do (greedy, float32, transformers). Loads
models: run through `heavy`."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from core.catalog import load_catalog
from core.types import GenerationParams, GenerationRequest, Message
from experts.weights import CONVERTED_MARKER, base_model_dir, context_length, gguf_path, residence

PROMPTS = ["What is the capital of France?", "What is 12 + 30?"]


def requests(expert: str) -> list[GenerationRequest]:
    return [GenerationRequest(expert=expert, messages=[Message(role="user", content=p)], params=GenerationParams(max_tokens=16))
            for p in PROMPTS]


def test_a_model_folder_a_gguf_file_and_an_adapter_folder_answer_as_the_embedded_experts(
        catalog, hf_backend, tmp_path, monkeypatch):
    from safetensors import safe_open

    from experts.backends import build_backend

    expected = {name: [a.text for a in hf_backend.generate(requests(name))] for name in ("smollm2-135m", "smollm2-math")}

    root = tmp_path / "mine"
    shutil.copytree(base_model_dir(catalog.get("smollm2-135m")), root / "models" / "smol")
    (root / "models" / "smol" / CONVERTED_MARKER).unlink()  # a plain Hugging Face folder, as a user has one
    shutil.copy(gguf_path(catalog.get("smollm2-135m")), root / "smol.gguf")
    shutil.copytree(catalog.adapter_dir(catalog.get("smollm2-math")), root / "adapters" / "math")
    (root / "catalog.yaml").write_text(textwrap.dedent("""\
        default_expert: smol-folder
        experts:
          - {name: smol-folder, kind: base, weights: {source: path, path: models/smol}, description: SmolLM2 from a folder}
          - {name: smol-gguf, kind: base, weights: {source: path, path: smol.gguf}, params: 134515008,
             description: SmolLM2 from a GGUF file}
          - {name: math-folder, kind: lora, base: smol-folder, weights: {source: path, path: adapters/math},
             description: the math adapter from a folder}
        """))
    mine = load_catalog(root / "catalog.yaml")
    assert mine.get("smol-folder").params == 134515008  # read from the safetensors header
    assert mine.get("math-folder").params == catalog.get("smollm2-math").params
    assert context_length(mine, mine.get("smol-folder")) == 8192

    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path / "cache"))  # the GGUF converts here, not in the user's cache
    assert residence(mine, mine.get("smol-gguf"))[0] == "gguf"
    backend = build_backend("hf", mine, dtype="float32")
    try:
        assert backend.runs_on("smol-gguf") == "hf" and not backend.unavailable
        got = {name: [a.text for a in backend.generate(requests(name))] for name in ("smol-folder", "smol-gguf", "math-folder")}
        assert got["smol-folder"] == expected["smollm2-135m"]
        assert got["smol-gguf"] == expected["smollm2-135m"]
        assert got["math-folder"] == expected["smollm2-math"]
        assert got["math-folder"] != got["smol-folder"]  # the adapter was applied
    finally:
        backend.close()

    converted = base_model_dir(mine.get("smol-gguf"))
    assert converted.parent == tmp_path / "cache" / "models" and converted.name.startswith("smol-gguf-")
    assert residence(mine, mine.get("smol-gguf")) == ("disk", str(converted))
    with safe_open(str(converted / "model.safetensors"), "pt") as f:  # STACK.md trap 4: the tied embedding is kept
        assert "model.embed_tokens.weight" in set(f.keys())
    assert base_model_dir(mine.get("smol-folder")) == (root / "models" / "smol").resolve()  # used where it is


def test_a_path_expert_with_a_missing_folder_leaves_the_others_serving(catalog, tmp_path):
    from core.errors import WeightsMissingError
    from experts.backends import build_backend

    (tmp_path / "catalog.yaml").write_text(textwrap.dedent("""\
        default_expert: gone
        experts:
          - {name: gone, kind: base, weights: {source: path, path: models/gone}, description: d}
        """))
    mine = load_catalog(tmp_path / "catalog.yaml")
    backend = build_backend("hf", mine)
    with pytest.raises(WeightsMissingError, match=f"expert 'gone': weights path {tmp_path.resolve()}/models/gone does not exist"):
        backend.generate(requests("gone"))
    assert backend.backends == {}


@pytest.mark.slow
def test_a_gguf_file_and_an_adapter_folder_on_vllm_answer_as_the_embedded_experts(catalog, hf_backend, tmp_path, monkeypatch):
    """The same on the vLLM engine (float32, one engine for the GGUF base and its LoRA from a folder):
    the GGUF converted here keeps its tied embedding where vLLM reads it."""
    pytest.importorskip("vllm", reason="the vLLM engine is not installed")
    from experts.backends import build_backend

    expected = {name: [a.text for a in hf_backend.generate(requests(name))] for name in ("smollm2-135m", "smollm2-math")}
    shutil.copy(gguf_path(catalog.get("smollm2-135m")), tmp_path / "smol.gguf")
    shutil.copytree(catalog.adapter_dir(catalog.get("smollm2-math")), tmp_path / "math")
    (tmp_path / "catalog.yaml").write_text(textwrap.dedent("""\
        default_expert: smol-gguf
        experts:
          - {name: smol-gguf, kind: base, weights: {source: path, path: smol.gguf}, params: 134515008, description: d}
          - {name: math-folder, kind: lora, base: smol-gguf, weights: {source: path, path: math}, description: d}
        """))
    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path / "cache"))
    backend = build_backend("vllm", load_catalog(tmp_path / "catalog.yaml"), dtype="float32", enforce_eager=True,
                            max_model_len=1024, max_num_seqs=8)
    try:
        assert backend.context_length("smol-gguf") == 1024  # the engine's max_model_len caps the model's 8192
        assert [a.text for a in backend.generate(requests("smol-gguf"))] == expected["smollm2-135m"]
        assert [a.text for a in backend.generate(requests("math-folder"))] == expected["smollm2-math"]
    finally:
        backend.close()
