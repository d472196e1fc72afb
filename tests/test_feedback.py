"""The feedback store (orchestrator/feedback.py) on a real SQLite file: scores by response id,
durable across reopening, several writing processes at once, retention, prompts kept or not, and
the outcome data a refit reads. Refits with the real embedder are in tests/test_byo_routers.py."""

import multiprocessing
import time

import numpy as np
import pytest

from core.config import FeedbackConfig
from core.errors import CoeError
from orchestrator.feedback import FeedbackStore, UnknownResponseError, parse_since
from tests.test_routing import one_hot_embed


def store_at(path, **options):
    return FeedbackStore(path, embed=one_hot_embed, **options)


def test_scores_credit_the_answering_experts_and_survive_reopening(tmp_path):
    path = tmp_path / "feedback.sqlite3"
    store = store_at(path)
    store.record("r1", "alpha question", "knn", ["a"])
    store.record("r2", "beta question", "symbolic", ["a", "b"])
    store.record("r3", "never scored", "knn", ["b"])
    assert store.score("r1", 1.0) == {"id": "r1", "policy": "knn", "experts": ["a"], "score": 1.0}
    store.score("r2", 0.25)
    store.score("r2", 0)  # the last score sent wins
    store.close()

    reopened = store_at(path)
    assert reopened.counts() == {"responses": 3, "scored": 2}
    assert reopened.get("r2") | {"created_at": None} == {"id": "r2", "created_at": None, "policy": "symbolic",
                                                          "experts": ["a", "b"], "query": "beta question", "embedder": None,
                                                          "score": 0.0}
    feedback = reopened.outcomes()
    assert feedback.data.texts == ["alpha question", "beta question"] and feedback.data.experts == ["a", "b"]
    assert feedback.data.outcomes[0, 0] == 1.0 and np.isnan(feedback.data.outcomes[0, 1])
    assert feedback.data.outcomes[1].tolist() == [0.0, 0.0] and feedback.data.categories == ["a", "a+b"]
    assert feedback.data.ids == ["r1", "r2"] and feedback.embeddings is None


def test_bad_feedback_is_refused_clearly(tmp_path):
    store = store_at(tmp_path / "f.sqlite3")
    store.record("r1", "alpha", "knn", ["a"])
    with pytest.raises(UnknownResponseError, match="no response with id 'nope' to score") as error:
        store.score("nope", 1)
    assert error.value.status_code == 404
    for bad in (1.5, -0.1, float("nan"), True, "1"):
        with pytest.raises(CoeError, match="is not a number in \\[0, 1\\]"):
            store.score("r1", bad)
    assert store.get("r1")["score"] is None


def test_without_log_prompts_only_the_embedding_is_kept(tmp_path):
    path = tmp_path / "private.sqlite3"
    store = store_at(path, log_prompts=False)
    store.record("r1", "alpha secret question", "knn", ["a"])
    store.record("r2", "beta secret question", "knn", ["b"], embedding=one_hot_embed(["beta"])[0], embedder="one_hot_embed")
    store.score("r1", 1)
    store.score("r2", 1)
    assert store.get("r1")["query"] is None and store.get("r1")["embedder"] == "one_hot_embed"
    store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the database, its WAL and index
    assert b"secret" not in stored
    feedback = store_at(path).outcomes()
    assert feedback.data.texts == ["", ""] and feedback.embeddings.tolist() == one_hot_embed(["alpha", "beta"]).tolist()


def test_embeddings_of_another_embedder_are_left_out_and_counted(tmp_path):
    path = tmp_path / "f.sqlite3"
    private = store_at(path, log_prompts=False)
    private.record("old", "alpha", "knn", ["a"], embedding=np.ones(4, dtype=np.float32), embedder="an-old-embedder")
    private.score("old", 1)
    with pytest.raises(CoeError, match="no scored responses \\(1 kept only embeddings of another embedder\\)"):
        private.outcomes()
    store_at(path).record("new", "beta", "knn", ["b"])
    store_at(path).score("new", 1)
    feedback = store_at(path).outcomes()
    assert feedback.data.ids == ["new"] and feedback.skipped == 1 and feedback.embeddings is None


def test_retention_deletes_old_responses_only(tmp_path):
    store = store_at(tmp_path / "f.sqlite3", retention_days=1)
    store.record("r1", "alpha", "knn", ["a"])
    store.score("r1", 1)
    assert store.purge(time.time() + 3600) == 0  # an hour later: kept
    assert store.purge(time.time() + 86400 + 60) == 1  # past a day: gone, scored or not
    with pytest.raises(UnknownResponseError):
        store.score("r1", 1)


def test_since_filters_what_a_refit_reads(tmp_path):
    store = store_at(tmp_path / "f.sqlite3")
    store.record("r1", "alpha", "knn", ["a"])
    store.score("r1", 1)
    assert store.outcomes(parse_since("1h")).data.ids == ["r1"]
    with pytest.raises(CoeError, match="no scored responses since"):
        store.outcomes(parse_since("2999-01-01"))
    with pytest.raises(CoeError, match="neither a duration nor a date"):
        parse_since("last week")


def write_and_score(path: str, writer: int, count: int, start) -> None:
    store = FeedbackStore(path, embed=one_hot_embed)
    start.wait()  # every writer imported and connected: they write at the same time
    for i in range(count):
        store.record(f"w{writer}-{i}", f"alpha {writer} {i}", "knn", ["a", "b"][i % 2: i % 2 + 1])
        store.score(f"w{writer}-{i}", (i % 3) / 2)


def test_several_processes_write_at_once_and_lose_nothing(tmp_path):
    path = tmp_path / "shared.sqlite3"
    FeedbackStore(path, embed=one_hot_embed)  # created once; the writers race on it
    spawn = multiprocessing.get_context("spawn")  # fresh processes, like Serve replicas
    start = spawn.Barrier(4)
    writers = [spawn.Process(target=write_and_score, args=(str(path), w, 60, start)) for w in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    assert [p.exitcode for p in writers] == [0, 0, 0, 0]
    store = store_at(path)
    assert store.counts() == {"responses": 240, "scored": 240}
    assert store.get("w3-59")["score"] == 1.0 and store.get("w0-1")["experts"] == ["b"]


def test_the_config_places_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("COE_STATE_DIR", str(tmp_path / "state"))
    assert FeedbackStore(embed=one_hot_embed).path == tmp_path / "state" / "feedback.sqlite3"
    store = FeedbackStore.from_config(FeedbackConfig(path=tmp_path / "elsewhere.db", retention_days=7, log_prompts=False))
    assert store.path == tmp_path / "elsewhere.db" and store.retention_days == 7 and not store.log_prompts
