"""The README's figures equal the result files they name, rounded as printed (evals/figures.py).
No model: milliseconds."""

import json

import pytest

from evals import figures
from evals.provenance import REPO


def test_every_marked_readme_figure_equals_its_result():
    checks = figures.check_readme()
    failed = [str(c) for c in checks if not c.ok]
    assert not failed, "README figures that differ from their results:\n" + "\n".join(failed)
    sources = {c.source.split(":")[0] for c in checks}
    assert len(checks) >= 60 and len(sources) >= 8  # the markers are there, across the results


def test_every_result_json_the_readme_links_is_quoted_with_markers():
    import re

    text = (REPO / "README.md").read_text()
    linked = {m for m in re.findall(r"\((evals/results/[^)\s]+\.json)\)", text)}
    quoted = {c.source.split(":")[0] for c in figures.check_readme()}
    assert linked and linked <= quoted, f"linked results with no marked figure: {linked - quoted}"


@pytest.fixture()
def results(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({
        "levels": {"1": {"ms": 93.8, "rps": 2.0}}, "bytes": 1520435200, "ratio": 5956.4, "rate": 0.1, "runs": [{"s": 12.3456}],
        "wins": {"math": True, "logic": True}, "lost": {"math": True, "logic": False}, "backend": "vllm",
        "acc": {"a": {"math": 0.3814, "logic": 0.52}, "b": {"math": 0.0928, "logic": 0.255}},
        "gpu": {"name": "NVIDIA H100 80GB HBM3"},
    }))
    return tmp_path


def check(tmp_path, text):
    (tmp_path / "README.md").write_text(text)
    return figures.check_readme(tmp_path / "README.md", tmp_path)


@pytest.mark.parametrize("text", [
    "adds 94 ms <!-- figure: r.json:levels.1.ms -->",
    "adds 93.8 ms <!-- figure: r.json:levels.1.ms -->",
    "frees 1.5 GB <!-- figure: r.json:bytes/1e9 --> and 1,520,435,200 bytes <!-- figure: r.json:bytes -->",
    "waking is ~6,000x <!-- figure: r.json:ratio --> faster, about 6,000 times <!-- figure: r.json:ratio -->",
    "failing 10% <!-- figure: r.json:rate*100 --> of calls, in 12.35 s <!-- figure: r.json:runs.0.s -->",
    "46.9 ms a request <!-- figure: r.json:levels.1.ms/levels.1.rps -->",
    "+0.289 over b <!-- figure: r.json:acc.a.math - acc.b.math --> and 0.775 together <!-- figure: r.json:acc.a.logic + acc.b.logic -->",
    "on an H100 <!-- holds: r.json:gpu.name=NVIDIA H100 80GB HBM3 -->",
    "the diagonal wins everywhere <!-- holds: r.json:wins --> on vLLM <!-- holds: r.json:backend=vllm -->",
    "<!-- table: r.json:acc.{row}.{column} -->\n| expert | math | logic |\n|---|---|---|\n| `a` (x) | **0.381** | 0.520 |\n| b | 0.093 | 0.255 |",
])
def test_figures_that_match(results, text):
    checks = check(results, text)
    assert checks and all(c.ok for c in checks), [str(c) for c in checks]


@pytest.mark.parametrize("text, problem", [
    ("adds 95 ms <!-- figure: r.json:levels.1.ms -->", "94"),  # a typed-in figure that drifted
    ("adds 93.9 ms <!-- figure: r.json:levels.1.ms -->", "93.8"),
    ("waking is 6,000x <!-- figure: r.json:ratio -->", "5956"),  # rounder than printed, without ~
    ("adds 94 ms <!-- figure: r.json:levels.2.ms -->", "no '2'"),
    ("adds ms <!-- figure: r.json:levels.1.ms -->", "no number"),
    ("none lost <!-- holds: r.json:lost -->", "does not hold"),
    ("on vLLM <!-- holds: r.json:backend=hf -->", "does not hold"),
    ("<!-- table: r.json:acc.{row}.{column} -->\n| expert | math |\n|---|---|\n| a | 0.382 |", "0.381"),
    ("adds 94 ms <!-- figure:r.json -->", "cannot be read"),  # a malformed marker is an error, never skipped
    ("adds 94 ms <!-- figure: r.json:levels.1.ms -- levels.1.rps -->", "cannot read"),
])
def test_figures_that_do_not_match(results, text, problem):
    checks = check(results, text)
    assert any(not c.ok for c in checks)
    assert problem in " ".join(str(c) for c in checks)


def test_update_rewrites_each_drifted_figure_as_it_was_printed(results):
    readme = results / "README.md"
    readme.write_text(
        "adds 95 ms <!-- figure: r.json:levels.1.ms --> or 93.9 ms <!-- figure: r.json:levels.1.ms -->\n"
        "waking is ~7,000x <!-- figure: r.json:ratio --> faster, 1,520,000,000 bytes <!-- figure: r.json:bytes -->, 1.4 GB "
        "<!-- figure: r.json:bytes/1e9 -->\n"
        "none lost <!-- holds: r.json:lost -->\n"
        "<!-- table: r.json:acc.{row}.{column} -->\n| expert | math | logic |\n|---|---|---|\n| `a` (x) | **0.382** | 0.520 |\n"
        "| b | 0.093 | 0.25 |\n")
    rewrites, left = figures.update_readme(readme, results)
    assert [new for _, new in rewrites] == ["94", "93.8", "6,000", "1,520,435,200", "1.5", "0.381", "0.26"]
    assert [c.source for c in left] == ["r.json:lost"]  # a claim that no longer holds needs a person
    text = readme.read_text()
    assert "adds 94 ms" in text and "or 93.8 ms" in text and "~6,000x" in text and "| `a` (x) | **0.381** | 0.520 |" in text
    assert [c.source for c in figures.check_readme(readme, results) if not c.ok] == ["r.json:lost"]


def test_against_a_revision_shows_how_far_each_figure_moved(results, tmp_path):
    import subprocess

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "add", "r.json"], check=True)
    subprocess.run([*git, "commit", "-qm", "results"], check=True)
    data = json.loads((tmp_path / "r.json").read_text())
    data["levels"]["1"]["ms"] = 103.18
    (tmp_path / "r.json").write_text(json.dumps(data))
    (tmp_path / "README.md").write_text("adds 103 ms <!-- figure: r.json:levels.1.ms -->, 0.52 <!-- figure: r.json:acc.a.logic -->\n"
                                        "on vLLM <!-- holds: r.json:backend=vllm -->\n")
    rows = figures.compare("HEAD", tmp_path / "README.md", tmp_path)
    assert [(r["then"], r["now"]) for r in rows] == [(93.8, 103.18), (0.52, 0.52)]
    assert rows[0]["moved_share"] == pytest.approx(0.1) and rows[1]["moved"] == 0
