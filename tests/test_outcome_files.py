"""Outcome files in the three formats `coe router fit --data` reads (routers/outcome_files.py):
what each becomes, that the same judgements in any format route alike, and one clear message
naming the file and line for every kind of bad input."""

import json

import numpy as np
import pytest

from core.errors import CoeError
from routers import build_router
from routers.outcome_files import read_outcome_file, read_outcome_files
from tests.test_routing import one_hot_embed


def write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_outcomes_format_a_missing_or_null_expert_failed_the_query(tmp_path):
    path = write(tmp_path / "o.jsonl", [
        {"id": "q1", "question": "Which is right?", "choices": ["this", "that"], "outcomes": {"a": 1, "b": 0.5}, "category": "x",
         "answer": "A", "benchmark": "mine"},
        "",
        {"id": 2, "question": "Another", "outcomes": {"a": None}},
    ])
    read = read_outcome_file(path)
    assert read.format == "outcomes" and read.data.experts == ["a", "b"]
    assert read.data.texts == ["Which is right?\n\nA. this\nB. that", "Another"]
    assert read.data.outcomes.tolist() == [[1.0, 0.5], [0.0, 0.0]]
    assert read.data.categories == ["x", "unknown"] and read.data.ids == ["q1", "2"] and read.answers == ["A", None]


def test_scores_format_averages_repeats_and_leaves_unmeasured_experts_out(tmp_path):
    path = write(tmp_path / "s.jsonl", [
        {"query": "boil an egg", "expert": "chef", "score": 1.0, "category": "cooking"},
        {"query": "boil an egg", "expert": "chef", "score": 0.5},
        {"query": "boil an egg", "expert": "lawyer", "score": 0},
        {"query": "sign a lease", "expert": "lawyer", "score": 0.9, "id": "lease"},
    ])
    read = read_outcome_file(path)
    assert read.format == "scores" and read.data.experts == ["chef", "lawyer"]
    assert read.data.texts == ["boil an egg", "sign a lease"]
    assert read.data.outcomes[0].tolist() == [0.75, 0.0]
    assert np.isnan(read.data.outcomes[1, 0]) and read.data.outcomes[1, 1] == 0.9
    assert read.data.categories == ["cooking", "unknown"] and read.data.ids[1] == "lease"
    assert read.data.ids[0].startswith("q-")  # a stable id from the text where none is given


def test_pairwise_format_gives_each_expert_its_win_rate(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        {"query": "q", "winner": "gpt", "loser": "mixtral"},
        {"query": "q", "winner": "gpt", "loser": "mixtral"},
        {"query": "q", "winner": "mixtral", "loser": "gpt"},
        {"query": "q", "winner": "gpt", "loser": "llama"},
        {"query": "r", "winner": "llama", "loser": "gpt", "tie": True},
    ])
    read = read_outcome_file(path)
    assert read.format == "pairwise" and read.data.experts == ["gpt", "llama", "mixtral"]
    assert read.data.outcomes[0].tolist() == pytest.approx([3 / 4, 0.0, 1 / 3])
    assert read.data.outcomes[1, :2].tolist() == [0.5, 0.5] and np.isnan(read.data.outcomes[1, 2])


def topic_rows():
    """Expert a is right on alpha questions, b on beta ones."""
    return [(f"{topic} question {i}", topic) for i in range(6) for topic in ("alpha", "beta")]


def test_the_same_judgements_in_every_format_route_alike(tmp_path):
    outcomes = write(tmp_path / "outcomes.jsonl", [
        {"id": f"q{i}", "question": q, "outcomes": {"a": float(t == "alpha"), "b": float(t == "beta")}}
        for i, (q, t) in enumerate(topic_rows())])
    scores = write(tmp_path / "scores.jsonl", [
        {"query": q, "expert": e, "score": float((e == "a") == (t == "alpha"))} for q, t in topic_rows() for e in ("a", "b")])
    pairwise = write(tmp_path / "pairwise.jsonl", [
        {"query": q, "winner": "a" if t == "alpha" else "b", "loser": "b" if t == "alpha" else "a"} for q, t in topic_rows()])
    for path in (outcomes, scores, pairwise):
        data = read_outcome_file(path).data
        assert data.outcomes.tolist() == [[float(t == "alpha"), float(t == "beta")] for _, t in topic_rows()], path.name
        router = build_router("knn", embed=one_hot_embed, neighbours=3).fit(data)
        assert [d.chosen[0].expert for d in router.route(["alpha new", "beta new"])] == ["a", "b"], path.name


def test_files_of_different_formats_make_one_data_set(tmp_path):
    outcomes = write(tmp_path / "o.jsonl", [{"id": "1", "question": "x", "outcomes": {"a": 1}}])
    pairwise = write(tmp_path / "p.jsonl", [{"query": "y", "winner": "b", "loser": "c"}])
    data, files = read_outcome_files([outcomes, pairwise])
    assert data.experts == ["a", "b", "c"] and [f.format for f in files] == ["outcomes", "pairwise"]
    assert data.outcomes[0].tolist() == [1.0, 0.0, 0.0]  # the outcomes file's experts b, c did not answer: failed
    assert np.isnan(data.outcomes[1, 0]) and data.outcomes[1, 1:].tolist() == [1.0, 0.0]  # a was not compared: unmeasured


GOOD_SCORE = {"query": "q", "expert": "a", "score": 1}


@pytest.mark.parametrize("bad, message", [
    ('{"query": "q", "expert": "a", "score": 1', "not valid JSON"),
    ('["query", "q"]', "not a JSON object"),
    ({**GOOD_SCORE, "weight": 2}, "unknown field 'weight'"),
    ({"query": "q", "expert": "a"}, "missing field 'score'"),
    ({**GOOD_SCORE, "score": 1.5}, "score: Input should be less than or equal to 1"),
    ({"query": "q", "winner": "a", "loser": "b"}, "a row of the pairwise format in a file of the scores format"),
    ({**GOOD_SCORE, "query": ""}, "query: String should have at least 1 character"),
])
def test_a_bad_line_fails_naming_the_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "bad.jsonl", [GOOD_SCORE, GOOD_SCORE, bad])
    with pytest.raises(CoeError, match=f"bad.jsonl:3: {message}"):
        read_outcome_file(path)


def test_other_bad_files_fail_naming_the_file_and_line(tmp_path):
    with pytest.raises(CoeError, match="x.jsonl:1: cannot tell the outcome format"):
        read_outcome_file(write(tmp_path / "x.jsonl", [{"prompt": "q", "model": "a"}]))
    with pytest.raises(CoeError, match="x.jsonl:2: winner and loser are both 'a'"):
        read_outcome_file(write(tmp_path / "x.jsonl", [{"query": "q", "winner": "a", "loser": "b"},
                                                       {"query": "q", "winner": "a", "loser": "a"}]))
    with pytest.raises(CoeError, match="x.jsonl:2: id 'q1' repeats line 1"):
        read_outcome_file(write(tmp_path / "x.jsonl", [{"id": "q1", "question": "q", "outcomes": {"a": 1}}] * 2))
    with pytest.raises(CoeError, match="x.jsonl:2: id 'q1' has another query than on line 1"):
        read_outcome_file(write(tmp_path / "x.jsonl", [{**GOOD_SCORE, "id": "q1"}, {**GOOD_SCORE, "id": "q1", "query": "r"}]))
    with pytest.raises(CoeError, match="has no rows"):
        read_outcome_file(write(tmp_path / "x.jsonl", ["", ""]))
    with pytest.raises(CoeError, match="does not exist"):
        read_outcome_file(tmp_path / "missing.jsonl")


def test_an_expert_the_catalog_lacks_fails_naming_the_file_and_line(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"query": "q", "winner": "chef", "loser": "lawyer"},
                                        {"query": "r", "winner": "chef", "loser": "plumber"}])
    assert read_outcome_file(path, known_experts={"chef", "lawyer", "plumber"}).data.experts == ["chef", "lawyer", "plumber"]
    with pytest.raises(CoeError, match=r"p.jsonl:2: expert 'plumber' is not in the catalog \(catalog experts: chef, lawyer\)"):
        read_outcome_file(path, known_experts={"chef", "lawyer"})
