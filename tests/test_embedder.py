"""The routing embedder: the fast ONNX int8 runtime agrees with sentence-transformers on torch."""

import numpy as np
import pytest

from core.errors import ConfigError
from routers.embedder import Embedder

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell?",
    "Which gas do plants absorb from the air for photosynthesis?\n\nA. oxygen\nB. carbon dioxide\nC. nitrogen\nD. helium",
    "A 45-year-old man presents with crushing chest pain radiating to the left arm. Which enzyme rises first?",
    "Is the following sentence plausible? \"Lionel Messi scored a touchdown in the fourth quarter.\"",
    "Write a short poem about the autumn sea.",
    "What were the main causes of the French Revolution?",
]


@pytest.fixture(scope="module")
def reference():
    return Embedder(runtime="torch").embed(QUESTIONS)


@pytest.mark.parametrize("runtime, min_cosine", [("onnx", 0.9999), ("onnx-int8", 0.97)])
def test_onnx_runtimes_match_sentence_transformers(reference, runtime, min_cosine):
    embedder = Embedder(runtime=runtime)
    vectors = embedder.embed(QUESTIONS)
    assert vectors.shape == (len(QUESTIONS), Embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (vectors * reference).sum(axis=1).min() >= min_cosine
    # Same neighbourhoods: each question's most similar other question is unchanged.
    def nearest(v):
        similarity = v @ v.T - 2 * np.eye(len(v))
        return similarity.argmax(axis=1).tolist()

    assert nearest(vectors) == nearest(reference)
    # Batching and order do not change a text's vector.
    single = embedder.embed(QUESTIONS[2:3])
    np.testing.assert_allclose(single[0], vectors[2], atol=1e-4)


def test_onnx_threads_do_not_spin_between_queries():
    """Spinning pool threads take a server's cores from its engines between routed queries (the
    CPU it costs is bench_embedder's `cpu_ms_per_query`)."""
    embedder = Embedder()
    embedder.embed(QUESTIONS[:1])
    options = embedder._model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_int8_is_the_default_and_caches_keep_runtimes_apart():
    """Which runtime is faster is measured by evals/bench_embedder.py (evals/results/bench_embedder.json), not raced here."""
    fast, slow = Embedder(), Embedder(runtime="torch")
    assert fast.runtime == "onnx-int8" and fast.name != slow.name


def test_unknown_runtime_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown embedder runtime 'gpu-magic'"):
        Embedder(runtime="gpu-magic")


def test_int8_weights_use_seven_bits_so_every_x86_cpu_computes_the_same_products():
    """8-bit weights saturate AVX2's pairwise int16 sums (vpmaddubsw) but not VNNI's: the same model
    routed differently on two CPUs of this machine kind. 7-bit weights keep every sum exact."""
    import onnx
    from onnx import numpy_helper

    embedder = Embedder()
    embedder.embed(QUESTIONS[:1])
    path = embedder._load().session._model_path
    int8_weights = [numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 36  # six layers of q, k, v, output, two feed-forward matrices
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in int8_weights)
    assert largest <= 64 and 2 * 255 * largest <= 2**15 - 1  # two u8 x s8 products fit an int16


def test_cached_embeddings_are_kept_apart_by_the_cpu_that_computed_them(tmp_path, monkeypatch):
    import core.cpu

    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path))
    embedder = Embedder()
    first = embedder.embed_cached(QUESTIONS[:2])
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 1
    np.testing.assert_array_equal(embedder.embed_cached(QUESTIONS[:2]), first)
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 1  # read back, not recomputed
    monkeypatch.setattr(core.cpu, "cpu_extensions", lambda: ("avx2",))
    embedder.embed_cached(QUESTIONS[:2])
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 2
