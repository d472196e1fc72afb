"""The serving policies: a router per policy of the config, fitted on the catalog's routing
examples (cached on disk, so a restart does not refit)."""

from __future__ import annotations

import hashlib
import json

from core.catalog import Catalog
from core.config import PolicyConfig
from core.paths import cache_dir
from experts.helpers import router_helpers
from routers import Router, build_router, load_router
from routers.base import EmbeddingRouter, catalog_examples

ROUTER_STATE_FORMAT = 4  # part of the fitted-router cache key: bump when saved router state changes


def build_policies(policies: dict[str, PolicyConfig], catalog: Catalog) -> dict[str, Router]:
    return {name: fit_policy(name, policy, catalog) for name, policy in policies.items()}


def fit_policy(name: str, policy: PolicyConfig, catalog: Catalog) -> Router:
    """Fit a policy's router on the catalog's experts; the fitted router is cached on disk."""
    from routers.embedder import shared_embedder

    options = {"fallback_expert": catalog.default_expert, **policy.options}
    data = catalog_examples(catalog, policy.examples_per_expert)
    key_source = json.dumps(
        {"policy": policy.model_dump(), "options": options, "experts": data.experts, "texts": data.texts,
         "labels": data.outcomes.argmax(axis=1).tolist(), "format": ROUTER_STATE_FORMAT,
         "embedder": shared_embedder().name},
        sort_keys=True, default=str,
    )
    directory = cache_dir() / "routers" / f"{name}-{hashlib.sha256(key_source.encode()).hexdigest()[:16]}"
    helpers = router_helpers(catalog)
    router = build_router(policy.router, helpers, **options)
    if (directory / "router.json").is_file():
        return load_router(directory, helpers, **options)
    embeddings = None
    if isinstance(router, EmbeddingRouter):
        embeddings = shared_embedder().embed_cached(data.texts)  # embedded once for every policy
    router.fit(data, embeddings)
    router.save(directory)
    return router
