"""Routers found by name: `ROUTERS[name](**options)` builds one, ready to fit or load."""

from __future__ import annotations

from routers.base import OutcomeData, Router
from routers.knn import KNNRouter

ROUTERS: dict[str, type[Router]] = {"knn": KNNRouter}

__all__ = ["ROUTERS", "OutcomeData", "Router", "build_router"]


def build_router(name: str, **options) -> Router:
    from orchestrator.errors import unknown

    if name not in ROUTERS:
        raise unknown("router", name, ROUTERS)
    return ROUTERS[name](**options)
