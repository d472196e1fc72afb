"""The serving policies: a router per policy of the config, either fitted on the catalog's routing
examples (zero-data start; cached on disk as a router folder, so a restart does not refit) or
loaded from a router folder the user fitted (`router_path`)."""

from __future__ import annotations

import hashlib
import json

from filelock import FileLock

from core.catalog import Catalog
from core.config import PolicyConfig
from core.errors import CoeError, ConfigError
from core.paths import cache_dir
from experts.helpers import router_helpers
from routers import Router, build_router, load_router
from routers.base import EmbeddingRouter, catalog_examples

ROUTER_STATE_FORMAT = 4  # part of the fitted-router cache key: bump when saved router state changes
VIRTUAL_PREFIX = "coe-"  # policies travel as virtual model names: coe-knn, ...


def build_policies(policies: dict[str, PolicyConfig], catalog: Catalog) -> dict[str, Router]:
    return {name: load_policy(name, policy, catalog) if policy.router_path is not None else fit_policy(name, policy, catalog)
            for name, policy in policies.items()}


def load_policy(name: str, policy: PolicyConfig, catalog: Catalog) -> Router:
    """The router in the policy's folder, as fitted; refused (ConfigError) where it routes to
    experts the catalog lacks, or is not the router the policy names."""
    router = load_router(policy.router_path, router_helpers(catalog))
    if "router" in policy.model_fields_set and policy.router != router.name:
        raise ConfigError(f"policy {name!r}: router_path {policy.router_path} holds a {router.name} router, not {policy.router}",
                          f"set router: {router.name} or drop `router` from the policy")
    missing = [e for e in router.experts if e not in catalog.names]
    if missing:
        raise ConfigError(f"policy {name!r}: the router in {policy.router_path} routes to experts the catalog lacks: "
                          f"{', '.join(missing)}",
                          "add them to the catalog, or refit the router on the catalog's experts (coe router fit --catalog)")
    for option, value in policy.options.items():  # serving knobs only (PolicyConfig checks)
        setattr(router, option, value)
    return router


def fit_policy(name: str, policy: PolicyConfig, catalog: Catalog) -> Router:
    """Fit a policy's router on the catalog's experts; the fitted router is cached on disk."""
    from routers.embedder import shared_embedder

    options = {"fallback_expert": catalog.default_expert, **policy.options}
    data = catalog_examples(catalog, policy.examples_per_expert)
    key_source = json.dumps(
        {"policy": policy.model_dump(), "options": options, "fingerprint": data.fingerprint(),
         "skills": data.expert_skills, "format": ROUTER_STATE_FORMAT, "embedder": shared_embedder().cache_key},
        sort_keys=True, default=str,
    )
    directory = cache_dir() / "routers" / f"{name}-{hashlib.sha256(key_source.encode()).hexdigest()[:16]}"
    helpers = router_helpers(catalog)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{directory}.lock"):  # replicas starting together fit once
        if (directory / "manifest.json").is_file():
            try:
                return load_router(directory, helpers, **options)
            except CoeError:
                pass  # a damaged cache entry: fitted again below, over it
        router = build_router(policy.router, helpers, **options)
        embeddings = None
        if isinstance(router, EmbeddingRouter):
            embeddings = shared_embedder().embed_cached(data.texts)  # embedded once for every policy
        router.fit(data, embeddings)
        router.fitted_on.source = "catalog examples"
        router.save(directory)
    return router


def policy_name(requested: str | None, policies: dict[str, Router], default: str) -> str | None:
    """The policy a request names (`coe` is the default one, `coe-NAME` is NAME), or None where
    it names none (it may name an expert)."""
    name = requested or default
    if name == "coe":
        return default
    if name.startswith(VIRTUAL_PREFIX) and name[len(VIRTUAL_PREFIX):] in policies:
        return name[len(VIRTUAL_PREFIX):]
    return name if name in policies else None
