"""Every committed result comes from a command: evals/regenerate.py names the step that writes each
file under evals/results/, in an order that respects what each step reads, and a result written
by its step records that step's command, the commit, the machine and the wall time
(evals/provenance.py). No model, no Ray: milliseconds."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from core.cpu import VECTOR_EXTENSIONS
from evals import provenance, regenerate
from evals.provenance import REPO

# Results committed before provenance existed; each leaves this list when its step is run again
# (`python -m evals.regenerate --only NAME`), and the test below fails until it does.
NOT_YET_REGENERATED: set[str] = set()

# Results written on a lent GPU machine whose copy held the files of a later commit than its .git
# said (before $COE_COMMIT took precedence): the record says its git HEAD and dirty; the commit its
# files came from differs from that HEAD only in the files listed, none of which the result depends on.
H200_COPY = ("9b0f0fa7358d72ef0ae39b967a2a4a5fc679eeb6", {"evals/provenance.py", "scripts/device_vllm.sh"})
WRITTEN_FROM_A_COPY = {"bench_vllm_sleep": H200_COPY, "bench_vllm_sleep_compiled": H200_COPY}


def committed_results() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "evals/results"], cwd=REPO, capture_output=True, text=True, check=True)
    return [line for line in listed.stdout.splitlines() if line]


def owners(path: str) -> list[str]:
    return [s.name for s in regenerate.STEPS for o in s.outputs if path == o or (o.endswith("/") and path.startswith(o))]


def test_every_committed_result_is_written_by_exactly_one_step():
    files = committed_results()
    assert len(files) > 20
    orphans = {f: owners(f) for f in files if len(owners(f)) != 1}
    assert not orphans, f"results without exactly one step in evals/regenerate.py: {orphans}"


def test_steps_come_after_the_steps_they_read():
    seen: set[str] = set()
    for step in regenerate.STEPS:
        assert set(step.after) <= seen, f"{step.name} runs before {set(step.after) - seen}"
        for record in step.records:
            assert any(record == o or (o.endswith("/") and record.startswith(o)) for o in step.outputs), record
        seen.add(step.name)
    assert [s.name for s in regenerate.STEPS].index("router_table") < [s.name for s in regenerate.STEPS].index("replay_table")


@pytest.mark.parametrize("step", regenerate.STEPS, ids=lambda s: s.name)
def test_a_regenerated_result_records_its_own_command(step):
    data = json.loads((REPO / step.records[0]).read_text())
    record = data.get(provenance.KEY) if isinstance(data, dict) else None
    if step.name in NOT_YET_REGENERATED:
        assert record is None, f"{step.name} carries provenance now: take it off NOT_YET_REGENERATED"
        return
    assert record is not None, f"{step.records[0]} has no provenance: regenerate it with `python -m evals.regenerate --only {step.name}`"
    assert provenance.check(record) == []
    assert record["command"] == shlex.join(step.command)  # written by the step's own command, not a variant of it
    if step.name in WRITTEN_FROM_A_COPY:
        files_from, differing = WRITTEN_FROM_A_COPY[step.name]
        assert record["commit"]["dirty"], f"{step.name} was regenerated cleanly: take it off WRITTEN_FROM_A_COPY"
        diff = subprocess.run(["git", "diff", "--name-only", record["commit"]["sha"], files_from, "--", *provenance.CODE],
                              cwd=REPO, capture_output=True, text=True, check=True)
        assert set(diff.stdout.split()) == differing
    else:
        assert not record["commit"]["dirty"], f"{step.records[0]} was written from uncommitted code"
    for other in step.records[1:]:
        assert json.loads((REPO / other).read_text())[provenance.KEY]["command"] == record["command"]


def test_regenerate_lists_every_step_in_order_and_rejects_unknown_names():
    listed = subprocess.run([sys.executable, "-m", "evals.regenerate", "--list"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    *steps, total = listed.stdout.splitlines()
    firsts = [line.split(":")[0] for line in steps if line and not line.startswith(" ")]
    assert firsts == [s.name for s in regenerate.STEPS]
    hours = sum(r["wall_seconds"] for r in map(regenerate.recorded, regenerate.STEPS) if r) / 3600
    assert total == f"recorded wall time of these steps together: {hours:.1f} h"  # how long `make results` takes
    dry = subprocess.run([sys.executable, "-m", "evals.regenerate", "--dry-run", "--only", "replay_table", "router_table"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.stdout.splitlines() == ["python -m evals.run_router_table", "python -m evals.run_replay_table"]  # dependency order
    unknown = subprocess.run([sys.executable, "-m", "evals.regenerate", "--only", "router_tabel"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert unknown.returncode != 0 and "router_table" in unknown.stderr


def test_provenance_records_command_machine_commit_and_note(monkeypatch):
    monkeypatch.setenv(provenance.NOTE_ENV, "machine shared with a training run")
    record = provenance.provenance({"limit": 3, "out": REPO / "x.json", "note": None}, argv=["--limit", "3"],
                                   program="python -m evals.bench_pool", backend="hf", started=0.0)
    assert provenance.check(record) == []
    assert record["command"] == "python -m evals.bench_pool --limit 3"
    assert record["arguments"] == {"limit": 3, "out": str(REPO / "x.json")}
    assert record["note"] == "machine shared with a training run"  # from regenerate's --note
    assert record["machine"]["backend"] == "hf" and record["machine"]["cores"] >= 1
    extensions = record["machine"]["cpu_extensions"]  # a list wherever /proc/cpuinfo is
    assert (extensions is None) != Path("/proc/cpuinfo").exists()
    assert set(extensions or []) <= set(VECTOR_EXTENSIONS)
    assert "torch" in record["machine"]["packages"] and len(record["commit"]["sha"]) == 40
    assert record["wall_seconds"] > 1e9  # since the epoch: `started` is a wall-clock time
    given = provenance.provenance({"note": "given on the command line"})
    assert given["note"] == "given on the command line"
    monkeypatch.delenv(provenance.NOTE_ENV)
    assert "note" not in provenance.provenance({})
    assert provenance.check({"command": "x"}) != []


def test_a_copy_records_the_commit_its_maker_names(monkeypatch):
    """A lent GPU machine gets this checkout's files with no .git, or with an older one: the commit
    comes from $COE_COMMIT, its dirtiness unknown rather than claimed clean."""
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    head = provenance.commit()["sha"]
    monkeypatch.setenv(provenance.COMMIT_ENV, head)
    assert provenance.commit()["sha"] == head and "from" not in provenance.commit()  # git agrees: git's word
    monkeypatch.setenv(provenance.COMMIT_ENV, "a" * 40)
    assert provenance.commit() == {"sha": "a" * 40, "dirty": None, "from": provenance.COMMIT_ENV, "git_head": head}
    monkeypatch.setattr(provenance, "_git", lambda *args: None)
    assert provenance.commit()["sha"] == "a" * 40
    monkeypatch.delenv(provenance.COMMIT_ENV)
    assert provenance.commit() == {"sha": None, "dirty": None}


def test_a_step_replaces_its_outputs_and_must_record_where_they_came_from(tmp_path, capfd):
    """regenerate's mechanics on two tiny generators in a scratch folder: old outputs go first, the
    note reaches the result, and a result without provenance fails its step."""
    write = "from evals.provenance import write_summary; write_summary({'answer': 42}, 'out/result.json')"
    stamped = regenerate.Step("tiny", ("python", "-c", write), ("out/",), ("out/result.json",), "a tiny generator")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("from an older run")
    outcome = regenerate.run_step(stamped, note="a quiet machine", root=tmp_path)
    assert outcome.status == "done", outcome
    assert not (tmp_path / "out" / "stale.txt").exists()
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["answer"] == 42 and result["provenance"]["note"] == "a quiet machine"
    assert result["provenance"]["command"] == "python -c"

    bare = "import json, pathlib; pathlib.Path('out').mkdir(); pathlib.Path('out/result.json').write_text(json.dumps({'answer': 42}))"
    unstamped = regenerate.Step("bare", ("python", "-c", bare), ("out/",), ("out/result.json",), "no provenance")
    outcome = regenerate.run_step(unstamped, note=None, root=tmp_path)
    assert outcome.status == "failed" and "carries no provenance" in outcome.detail[0]
    failing = regenerate.Step("fails", ("python", "-c", "raise SystemExit(3)"), ("out/",), ("out/result.json",), "fails")
    assert regenerate.run_step(failing, note=None, root=tmp_path).detail == ["exit status 3"]


def test_code_defaults_are_the_ones_their_benchmarks_chose():
    """The routers' load penalty is the one bench_residency picked on validation; the pool's
    accounted engine memory covers what bench_engine_memory measured one more engine to take."""
    from experts.backends.vllm import ENGINE_OVERHEAD_GIB
    from routers.base import DEFAULT_LOAD_PENALTY

    residency = json.loads((REPO / "evals/results/bench_residency.json").read_text())
    assert DEFAULT_LOAD_PENALTY == residency["default_penalty"]
    memory = json.loads((REPO / "evals/results/bench_engine_memory.json").read_text())
    assert memory["overhead_gib"] <= ENGINE_OVERHEAD_GIB < memory["overhead_gib"] + 0.25
