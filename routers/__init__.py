"""Routers found by name: `ROUTERS[name](**options)` builds one, ready to fit or load."""

from __future__ import annotations

from routers.base import OutcomeData, Router
from routers.baselines import OracleRouter, RandomRouter, SingleBestRouter
from routers.best import BestRouter
from routers.cluster import ClusterRouter
from routers.coe import CoERouter
from routers.dc import DCRouter
from routers.glider import GliderRouter
from routers.knn import KNNRouter
from routers.mf import MFRouter
from routers.symbolic import SymbolicRouter

ROUTERS: dict[str, type[Router]] = {
    "knn": KNNRouter,
    "coe": CoERouter,
    "symbolic": SymbolicRouter,
    "glider": GliderRouter,
    "cluster": ClusterRouter,
    "mf": MFRouter,
    "dc": DCRouter,
    "best": BestRouter,
    "random": RandomRouter,
    "single_best": SingleBestRouter,
    "oracle": OracleRouter,
}

__all__ = ["ROUTERS", "OutcomeData", "Router", "build_router", "load_router"]


def build_router(name: str, helpers: dict | None = None, **options) -> Router:
    """`helpers`: model helpers by option name; each router takes the ones it lists."""
    from core.errors import unknown
    from routers.folder import json_safe

    if name not in ROUTERS:
        raise unknown("router", name, ROUTERS)
    router = ROUTERS[name](**helpers_for(ROUTERS[name], helpers), **options)
    router.options = json_safe(options)  # for the router folder's manifest: what describes it, not the functions handed in
    return router


def helpers_for(cls: type[Router], helpers: dict | None) -> dict:
    return {k: v for k, v in (helpers or {}).items() if k in cls.helpers}


def load_router(directory, helpers: dict | None = None, **options) -> Router:
    """A router from the folder `Router.save` wrote (routers/folder.py), of the class its manifest
    names; the folder's format version and embedder are checked, with a CoeError that says what
    is wrong."""
    from core.errors import unknown
    from routers.folder import read_manifest

    name = read_manifest(directory).router
    if name not in ROUTERS:
        raise unknown("router", name, ROUTERS)
    return ROUTERS[name].load(directory, **helpers_for(ROUTERS[name], helpers), **options)
