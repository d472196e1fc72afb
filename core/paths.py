"""Where coe keeps what it derives (the cache), what it must keep (its state: feedback) and
where it reads benchmark data from."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import CoeError

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Converted weights, exported embedders, fitted routers, written texts (COE_CACHE_DIR moves it)."""
    root = Path(os.environ.get("COE_CACHE_DIR", Path.home() / ".cache" / "coe"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def state_dir() -> Path:
    """coe's own state that a cache wipe must not lose: the feedback store (COE_STATE_DIR moves it)."""
    root = Path(os.environ.get("COE_STATE_DIR", Path.home() / ".local" / "share" / "coe"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_dir() -> Path:
    path = Path(os.environ.get("COE_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise CoeError(f"benchmark data directory {path} does not exist", "set COE_DATA_DIR to the shared data folder")
    return path
