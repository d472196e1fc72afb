"""The `coe` command as a user runs it: a real process, real models."""

import json
import subprocess
import sys
from pathlib import Path

COE = str(Path(sys.executable).with_name("coe"))


def coe(*args, timeout=600):
    return subprocess.run([COE, *args], capture_output=True, text=True, timeout=timeout)


def ask_json(question, *extra):
    run = coe("ask", question, "--json", "--max-tokens", "24", *extra)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Task was destroyed" not in run.stderr  # the engine loop's tasks end before the process does
    return json.loads(run.stdout)


def test_ask_routes_arithmetic_to_the_math_expert():
    out = ask_json("What is 17 * 23?")
    chosen = [e["name"] for e in out["experts"] if e["chosen"]]
    assert chosen == ["smollm2-math"], out
    assert out["answer"].strip()
    assert {"route", "generate", "total"} <= set(out["timings"])
    assert out["usage"]["completion_tokens"] > 0


def test_ask_shows_routing_in_plain_output_and_sends_medicine_to_its_expert():
    question = "Which nerve supplies the deltoid muscle?\n\nA. Radial\nB. Axillary\nC. Ulnar\nD. Median"
    run = coe("ask", question, "--max-tokens", "16")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "timings" in run.stdout
    assert "experts smollm2-medicine " in " ".join(run.stdout.split()), run.stdout  # ranked first, the one chosen


def test_unknown_policy_is_one_clear_line():
    run = coe("ask", "hello", "--policy", "nonsense")
    assert run.returncode == 2
    assert "unknown policy or expert 'nonsense'" in run.stderr and "coe-knn" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) <= 2


def test_malformed_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "coe.yaml"
    bad.write_text("default_policy: knn\npolicies: {knn: {router: knn, bogus_key: 1}}\n")
    run = coe("experts", "list", "--config", str(bad))
    assert run.returncode == 2 and "bogus_key" in run.stderr and "Traceback" not in run.stderr
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("experts: []\n")
    bad.write_text(f"catalog: {catalog}\n")
    run = coe("experts", "list", "--config", str(bad))
    assert run.returncode == 2 and "default_expert" in run.stderr and "Traceback" not in run.stderr


def test_experts_list_shows_sizes_and_residence():
    run = coe("experts", "list", "--json")
    assert run.returncode == 0, run.stderr
    rows = {r["name"]: r for r in json.loads(run.stdout)}
    assert rows["smollm2-math"]["resides"] == "disk" and rows["smollm2-math"]["size_bytes"] > 0
    assert rows["smollm2-135m"]["default"] is True
    from experts.backends import vllm_installed

    assert rows["smollm2-math"]["backend"] == ("vllm" if vllm_installed() else "hf")  # what `coe serve` runs it on
    table = coe("experts", "list")
    assert "smollm2-medicine" in table.stdout and "134.5M" in table.stdout
