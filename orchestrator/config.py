"""One YAML config for the whole service, validated by pydantic. No file: the embedded default."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


class PolicyConfig(_Strict):
    router: str = "knn"
    options: dict = Field(default_factory=dict)  # passed to the router's constructor
    examples_per_expert: int = Field(300, ge=10)  # training questions per expert to fit on
    default_expert_examples: int = Field(600, ge=10)  # the general expert's topics are the most diverse


class BackendConfig(_Strict):
    # auto: vLLM where it is installed (one engine per base, continuous batching), else transformers (hf).
    name: str = "auto"
    # Passed to the chosen backend; both default to bfloat16. hf: dtype, max_batch_size, threads.
    # vllm: dtype, max_model_len, max_loras, max_lora_rank, max_cpu_loras, kv_cache_gib, max_num_seqs, enforce_eager.
    options: dict = Field(default_factory=dict)


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_cpus: int | None = None  # CPUs Ray may use; None: all of them
    route_prefix: str = "/"
    # Bearer API keys; empty: no auth. The environment variable COE_API_KEYS (comma-separated) adds keys.
    api_keys: list[str] = Field(default_factory=list)
    log_prompts: bool = False  # prompt text never reaches the logs unless this is on

    def effective_api_keys(self) -> list[str]:
        import os

        extra = [k.strip() for k in os.environ.get("COE_API_KEYS", "").split(",") if k.strip()]
        return [*self.api_keys, *extra]


class CoeConfig(_Strict):
    catalog: Path | None = None  # None: experts/catalog/default.yaml
    backend: BackendConfig = Field(default_factory=BackendConfig)
    default_policy: str = "knn"
    # Every router whose fit on the embedded pool is fast (well under a second once the pool's
    # examples are embedded) and deterministic. GLIDER's local gates run the base model over the
    # training examples (minutes on a CPU), so they are opt-in: options {local_weight: 0.5}.
    policies: dict[str, PolicyConfig] = Field(default_factory=lambda: {
        "knn": PolicyConfig(router="knn", options={"neighbours": 10}),
        **{name: PolicyConfig(router=name) for name in ("coe", "symbolic", "glider")}})
    serve: ServeConfig = Field(default_factory=ServeConfig)

    def load_catalog(self):
        from experts.catalog import load_catalog

        return load_catalog(self.catalog)


def load_config(path: str | Path | None = None) -> CoeConfig:
    if path is None:
        return CoeConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", "pass an existing YAML file or omit --config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        config = CoeConfig.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}".replace("\n", " "), "fix the YAML syntax") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"config {path}: {where}: {first['msg']}", "see the README's configuration section") from None
    if config.catalog is not None and not config.catalog.is_absolute():
        config.catalog = (path.parent / config.catalog).resolve()
    if config.default_policy not in config.policies:
        raise ConfigError(f"config {path}: default_policy {config.default_policy!r} is not in policies",
                          f"choose one of: {', '.join(sorted(config.policies))}")
    return config
