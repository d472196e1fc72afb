"""`coe eval run` on real models: a run killed mid-way resumes with nothing lost or redone, MT-Bench
answers are saved and judged, and a run over HTTP against the real Serve app."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import API_KEY

COE = str(Path(sys.executable).with_name("coe"))


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "run"
    args = [COE, "eval", "run", "--benchmark", "arc_challenge", "--policy", "smollm2-science", "--limit", "16",
            "--batch-size", "2", "--max-tokens", "8", "--out", str(out)]
    results = out / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if results.is_file() and len(results.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = results.read_text().splitlines()
    assert 4 <= len(before) < 16
    assert not (out / "summary.json").exists()

    finished = subprocess.run(args + ["--json"], capture_output=True, text=True, timeout=600, env=env)
    assert finished.returncode == 0, finished.stderr[-2000:]
    summary = json.loads(finished.stdout)
    lines = results.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    complete_before = [line for line in before if line.endswith("}")]
    assert lines[: len(complete_before)] == complete_before  # finished items kept as they were
    assert len(records) == 16 and len({r["id"] for r in records}) == 16  # nothing lost, nothing twice
    assert summary["items"] == 16 and summary["backend"] == "hf"
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 16)
    assert summary["expert_calls"] == {"smollm2-science": 16}
    assert summary["tokens"]["completion"] == sum(r["completion_tokens"] for r in records) > 0
    assert summary["mean_active_params"] == pytest.approx(134515008 + 2442240)  # the base and its adapter
    assert all(r["predicted"] is None or r["predicted"] in "ABCDE" for r in records)
    assert {"report.md", "summary.json", "category_accuracy.png"} <= {p.name for p in out.iterdir()}

    compare = subprocess.run([COE, "eval", "compare", str(out)], capture_output=True, text=True, timeout=120)
    assert compare.returncode == 0 and f"| run | arc_challenge | smollm2-science | hf | 16 | {summary['accuracy']:.4f} |" in compare.stdout


def test_mt_bench_answers_both_turns_and_a_judge_rates_them(pipeline, tmp_path):
    from evals.runner import PipelineTarget, RunConfig, run_benchmark

    config = RunConfig(benchmark="mt_bench", policy="smollm2-135m", limit=2, max_tokens=12, judge="smollm2-135m",
                       judge_max_tokens=24)
    summary = run_benchmark(config, tmp_path, target=PipelineTarget(pipeline), progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and summary["accuracy"] is None
    for r in records:
        assert r["kind"] == "judge" and len(r["answers"]) == 2 and all(a.strip() for a in r["answers"])
        assert r["judge"] == "smollm2-135m" and len(r["judge_ratings"]) == 2
    assert summary["expert_calls"] == {"smollm2-135m": 4}  # two turns each; the judge's calls are not the policy's
    assert summary["judge"]["model"] == "smollm2-135m"


def test_a_run_over_http_against_coe_serve(serve_url, tmp_path, monkeypatch):
    from evals.runner import RunConfig, run_benchmark

    monkeypatch.setenv("COE_API_KEY", API_KEY)
    config = RunConfig(benchmark="gsm8k", policy="coe", via=serve_url, limit=3, batch_size=3, max_tokens=16)
    summary = run_benchmark(config, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert summary["backend"] == "http" and summary["items"] == 3
    assert all(r["experts"] == ["smollm2-math"] for r in records)  # the default policy routes arithmetic to math
    assert summary["tokens"]["completion"] > 0 and summary["mean_active_params"] is None
