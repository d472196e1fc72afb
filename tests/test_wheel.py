"""The installed package routes with no data directory: a wheel of this tree installed into a fresh
venv (its dependencies borrowed from the test's own environment through a .pth line, so nothing is
downloaded), run from a folder with no ../shared/data, COE_DATA_DIR unset and a cold cache: every
default policy fits from the routing examples packaged in experts/catalog/examples and routes one
question of each task to its expert. About a minute (ONNX export of the embedder, ~1,800 examples
embedded): in the default suite all the same, since nothing else checks what a user installs."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = {
    "What is 17 * 23?": "smollm2-math",
    "Why does ice float on water?": "smollm2-science",
    "Which nerve supplies the deltoid muscle?": "smollm2-medicine",
    "Is the following statement true: not (True and False) is True?": "smollm2-logic",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh venv's bin folder, an environment without data or the source tree)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                "runs", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source],
                   check=True)
    [wheel] = (root / "dist").glob("coe-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The dependencies: this environment's site-packages as a plain path (its .pth files, the
    # editable install of this tree among them, are not processed from there).
    (Path(purelib) / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("COE_DATA_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"COE_CACHE_DIR": str(root / "cache"), "COE_STATE_DIR": str(root / "state"), "PATH": f"{venv / 'bin'}:{env['PATH']}"}
    workdir = root / "nowhere" / "run"
    workdir.mkdir(parents=True)
    return venv / "bin", env, workdir


def test_the_installed_package_routes_every_task_to_its_expert_without_a_data_directory(installed):
    bin_dir, env, workdir = installed
    assert not (workdir.parent / "shared" / "data").exists()
    probe = ("import core.paths, routers; print(routers.__file__)\n"
             "try:\n    core.paths.data_dir()\nexcept Exception as e:\n    print('no data:', e)")
    where = subprocess.run([bin_dir / "python", "-c", probe], cwd=workdir, env=env, check=True, capture_output=True,
                           text=True).stdout
    assert str(bin_dir.parent) in where.splitlines()[0]  # the installed copy, not this tree
    assert "no data: benchmark data directory" in where
    for policy in ("knn", "coe", "symbolic", "glider"):
        reply = subprocess.run([bin_dir / "coe", "route", "--json", "--policy", policy, *QUESTIONS], cwd=workdir, env=env,
                               capture_output=True, text=True, timeout=600, check=False)
        assert reply.returncode == 0, reply.stderr[-2000:]
        decisions = json.loads(reply.stdout)
        assert {d["question"]: d["ranked"][0]["expert"] for d in decisions} == QUESTIONS, policy
