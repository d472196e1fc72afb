"""Regenerate every committed result under evals/results/ with the command that produces it.

    python -m evals.regenerate [--only NAME ...] [--skip NAME ...] [--list] [--dry-run] [--note TEXT]
    make results                       # the same, every step

Steps run in dependency order (the router table before the replay table, which reads its tuned
options and offline accuracy; both ARC-Challenge runs before their comparison), each as its own
process running the generator's own command line. A step first removes the outputs it owns (a
`coe eval run` directory would otherwise resume the old run), then checks that it wrote them
and that each result JSON carries its provenance (evals/provenance.py: command, arguments,
commit, machine, wall time). `--note` reaches every step as COE_RESULT_NOTE and is stored as the
results' `note`. Steps that need what the machine lacks (a CUDA GPU, the vLLM engine, the
`clients` extra: lm-eval and guidellm, QEMU's user-mode emulator) are skipped and listed. `--list` shows every step with the wall time its committed result records.

Several steps start Ray or vLLM engines and time what they serve: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from evals.provenance import KEY, NOTE_ENV, REPO, check

LIVE = "evals/results/live"


@dataclass(frozen=True)
class Step:
    name: str
    command: tuple[str, ...]  # "python ..." or "coe ...", as a user would type it
    outputs: tuple[str, ...]  # files, or folders ending in "/", relative to the repository
    records: tuple[str, ...]  # the result JSON files that must carry provenance
    about: str
    after: tuple[str, ...] = ()
    # "vllm" (the engine installed), "cuda" (a GPU), "ray" (starts a local Ray), "clients" (the
    # `clients` extra: lm-eval, guidellm), "qemu" (QEMU's x86-64 user-mode emulator)
    needs: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        program, *rest = self.command
        if program == "python":
            return [sys.executable, *rest]
        return [str(Path(sys.executable).with_name(program)), *rest]


def _live_run(name: str, policy: str) -> Step:
    folder = f"{LIVE}/arc_challenge-{name}"
    return Step(f"live_{name}", ("coe", "eval", "run", "--benchmark", "arc_challenge", "--policy", policy, "--limit", "200",
                                 "--out", folder), (folder + "/",), (f"{folder}/summary.json",),
                f"200 ARC-Challenge items through the embedded pool in-process, policy {policy}")


STEPS: tuple[Step, ...] = (
    Step("bench_route_latency", ("python", "-m", "evals.bench_route_latency", "--out", "evals/results/bench_route_latency.json"),
         ("evals/results/bench_route_latency.json",), ("evals/results/bench_route_latency.json",),
         "batch-1 routing latency with the embedding, every router interleaved in one process"),
    Step("router_table", ("python", "-m", "evals.run_router_table"), ("evals/results/routers/",),
         ("evals/results/routers/summary.json",),
         "every router and baseline on the recorded outcomes of MMLU-Pro, LLMRouter and RouteLLM",
         after=("bench_route_latency",)),  # its prose quotes the latency bench
    Step("replay_table", ("python", "-m", "evals.run_replay_table"), ("evals/results/replay/",),
         ("evals/results/replay/summary.json",),
         "every policy through the whole pipeline on MMLU-Pro replay, planned vs naive loading",
         after=("router_table",)),
    Step("expert_table", ("python", "-m", "evals.expert_table", "--limit", "200", "--backend", "vllm"),
         ("evals/results/expert_task_table.json", "evals/results/expert_task_table.md", "evals/results/expert_task_table.png"),
         ("evals/results/expert_task_table.json",), "every expert on every expert's held-out task, on the serving engine",
         needs=("vllm",)),
    _live_run("coe", "coe"),
    _live_run("smollm2-135m", "smollm2-135m"),
    Step("live_compare", ("coe", "eval", "compare", f"{LIVE}/arc_challenge-coe", f"{LIVE}/arc_challenge-smollm2-135m",
                          "--out", f"{LIVE}/compare"), (f"{LIVE}/compare/",), (f"{LIVE}/compare/compare.json",),
         "the two ARC-Challenge runs side by side", after=("live_coe", "live_smollm2-135m")),
    Step("lm_eval_arc_challenge", ("python", "-m", "evals.client_lm_eval", "--benchmark", "arc_challenge", "--limit", "100",
                                   "--dtype", "float32", "--json", "evals/results/clients/lm_eval_arc_challenge.json"),
         ("evals/results/clients/lm_eval_arc_challenge.json",), ("evals/results/clients/lm_eval_arc_challenge.json",),
         "lm-evaluation-harness against coe's HTTP app vs the in-process `coe eval run`, 100 ARC-Challenge items",
         needs=("clients",)),
    Step("bench_residency", ("python", "-m", "evals.bench_residency", "--json", "evals/results/bench_residency.json",
                             "--plot", "evals/results/bench_residency.png"),
         ("evals/results/bench_residency.json", "evals/results/bench_residency.png"), ("evals/results/bench_residency.json",),
         "residency-aware routing on MMLU-Pro replay: accuracy vs simulated load seconds as load_penalty grows"),
    Step("bench_embedder", ("python", "-m", "evals.bench_embedder", "--out", "evals/results/bench_embedder.json"),
         ("evals/results/bench_embedder.json",), ("evals/results/bench_embedder.json",),
         "the routing embedder's runtimes at batch 1"),
    Step("embedder_isa", ("python", "-m", "evals.embedder_isa", "--out", "evals/results/embedder_isa.json"),
         ("evals/results/embedder_isa.json",), ("evals/results/embedder_isa.json",),
         "the routing embedder's vectors here and on an emulated AVX2-only CPU (QEMU user mode)", needs=("qemu",)),
    Step("bench_pool", ("python", "-m", "evals.bench_pool", "--out", "evals/results/bench_pool.json"),
         ("evals/results/bench_pool.json",), ("evals/results/bench_pool.json",),
         "tiered pool: planned vs per-request and grouped loading, prefetch, tiers vs raw copies"),
    Step("bench_pool_short_prompts", ("python", "-m", "evals.bench_pool", "--prompt-words", "12",
                                      "--out", "evals/results/bench_pool_short_prompts.json"),
         ("evals/results/bench_pool_short_prompts.json",), ("evals/results/bench_pool_short_prompts.json",),
         "the same with chat-length prompts (decode-bound)"),
    Step("bench_backends", ("python", "-m", "evals.bench_backends", "--json", "evals/results/bench_backends.json"),
         ("evals/results/bench_backends.json",), ("evals/results/bench_backends.json",),
         "vLLM vs transformers backends, online and static", needs=("vllm",)),
    Step("bench_serve", ("python", "-m", "evals.bench_serve", "--out", "evals/results/bench_serve.json"),
         ("evals/results/bench_serve.json",), ("evals/results/bench_serve.json",),
         "HTTP through Serve vs the in-process pipeline at 1, 8 and 32 clients", needs=("ray",)),
    Step("gateway_sweep_app", ("python", "-m", "evals.bench_gateway_sweep", "--coe-server", "app", "--rates", "1,2,4,8",
                               "--seconds", "30", "--json", "evals/results/clients/gateway_sweep_app.json"),
         ("evals/results/clients/gateway_sweep_app.json",), ("evals/results/clients/gateway_sweep_app.json",),
         "guidellm constant-rate sweep: coe's in-process HTTP app vs vLLM's own OpenAI server, same model",
         needs=("vllm", "clients")),
    Step("bench_remote", ("python", "-m", "evals.bench_remote", "--out", "evals/results/bench_remote.json"),
         ("evals/results/bench_remote.json",), ("evals/results/bench_remote.json",),
         "coe in front of vLLM's OpenAI server vs calling it directly, at 1 and 8 clients", needs=("vllm",)),
    Step("load_report", ("python", "-m", "evals.bench_load", "--max-seconds", "1500", "--out", "evals/results/load_report.json"),
         ("evals/results/load_report.json",), ("evals/results/load_report.json",),
         "2,000 requests at 16 clients with an expert failing 10% of calls", needs=("ray",)),
    Step("bench_aggregators", ("python", "-m", "evals.bench_aggregators", "--limit", "60"),  # writes evals/results/ by default
         ("evals/results/bench_aggregators.json", "evals/results/bench_aggregators.md"),
         ("evals/results/bench_aggregators.json",),
         "synthesis vs vote vs the best single of the k, on the embedded experts' held-out tasks", needs=("vllm",)),
    Step("bench_engine_memory", ("python", "-m", "evals.bench_engine_memory", "--engines", "3",
                                 "--out", "evals/results/bench_engine_memory.json"),
         ("evals/results/bench_engine_memory.json",), ("evals/results/bench_engine_memory.json",),
         "what one more vLLM engine takes from the machine's memory, against what the pool accounts", needs=("vllm",)),
    Step("bench_hot_experts", ("python", "-m", "evals.bench_hot_experts"),  # writes evals/results/ by default
         ("evals/results/bench_hot_experts.json",), ("evals/results/bench_hot_experts.json",),
         "coe serve (base, one LoRA expert, routed; hot experts as merged copies) vs a bare vLLM server",
         needs=("vllm", "ray")),
    Step("bench_vllm_sleep", ("python", "-m", "evals.bench_vllm_sleep", "--out", "evals/results/bench_vllm_sleep.json"),
         ("evals/results/bench_vllm_sleep.json",), ("evals/results/bench_vllm_sleep.json",),
         "vLLM sleep/wake as the host tier (eager mode)", needs=("vllm", "cuda")),
    Step("bench_vllm_sleep_compiled", ("python", "-m", "evals.bench_vllm_sleep", "--compile",
                                       "--out", "evals/results/bench_vllm_sleep_compiled.json"),
         ("evals/results/bench_vllm_sleep_compiled.json",), ("evals/results/bench_vllm_sleep_compiled.json",),
         "the same with CUDA graphs", needs=("vllm", "cuda")),
)
BY_NAME = {step.name: step for step in STEPS}


def missing_needs(step: Step) -> list[str]:
    missing = []
    if "vllm" in step.needs and importlib.util.find_spec("vllm") is None:
        missing.append("the vLLM engine (scripts/install.sh)")
    if "cuda" in step.needs:
        smi = shutil.which("nvidia-smi")
        if smi is None or subprocess.run([smi, "-L"], capture_output=True).returncode != 0:
            missing.append("a CUDA GPU")
    if "qemu" in step.needs:
        from evals.embedder_isa import qemu

        if qemu() is None:
            missing.append("QEMU's user-mode emulator on an x86-64 host (apt-get install qemu-user)")
    if "clients" in step.needs and any(importlib.util.find_spec(name) is None for name in ("lm_eval", "guidellm")):
        missing.append("the clients extra (pip install -e .[clients])")
    return missing


def recorded(step: Step) -> dict | None:
    """The provenance of the step's committed result, if its first record carries one."""
    path = REPO / step.records[0]
    try:
        return json.loads(path.read_text()).get(KEY)
    except (OSError, ValueError, AttributeError):
        return None


def clear_outputs(step: Step, root: Path = REPO) -> None:
    for output in step.outputs:
        path = root / output
        if output.endswith("/"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def verify(step: Step, root: Path = REPO) -> list[str]:
    """What the step failed to write: missing outputs, records without a complete provenance."""
    problems = [f"{output} was not written" for output in step.outputs if not (root / output).exists()]
    for record in step.records:
        try:
            data = json.loads((root / record).read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{record}: {exc}")
            continue
        if not isinstance(data, dict) or KEY not in data:
            problems.append(f"{record} carries no {KEY}")
        else:
            problems += [f"{record}: {p}" for p in check(data[KEY])]
    return problems


@dataclass
class Outcome:
    step: str
    status: str  # done, failed, skipped
    seconds: float = 0.0
    detail: list[str] = field(default_factory=list)


def run_step(step: Step, note: str | None, root: Path = REPO) -> Outcome:
    """Run one step in `root` (the repository; another folder in tests)."""
    missing = missing_needs(step)
    if missing:
        return Outcome(step.name, "skipped", detail=[f"needs {', '.join(missing)}"])
    clear_outputs(step, root)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    if note:
        env[NOTE_ENV] = note
    print(f"\n== {step.name}: {shlex.join(step.command)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(step.argv(), cwd=root, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return Outcome(step.name, "failed", seconds, [f"exit status {done.returncode}"])
    problems = verify(step, root)
    return Outcome(step.name, "failed" if problems else "done", seconds, problems)


def selected(only: list[str] | None, skip: list[str] | None) -> list[Step]:
    from core.errors import unknown

    for name in [*(only or []), *(skip or [])]:
        if name not in BY_NAME:
            raise unknown("result step", name, BY_NAME)
    return [s for s in STEPS if (not only or s.name in only) and s.name not in (skip or [])]


def list_steps(steps: list[Step]) -> None:
    """Every step, and at the end how long they took together as last recorded (each on the
    machine of its own run): about how long `make results` will take."""
    total = 0.0
    for step in steps:
        record = recorded(step)
        total += record["wall_seconds"] if record else 0.0
        last = f"{record['wall_seconds']:.0f} s on {record['started_at'][:10]}" if record else "not recorded"
        print(f"{step.name}: {shlex.join(step.command)}")
        print(f"    {step.about}; writes {', '.join(step.outputs)}")
        extras = [f"after {', '.join(step.after)}" if step.after else "", f"needs {', '.join(step.needs)}" if step.needs else "",
                  f"last run: {last}"]
        print("    " + "; ".join(e for e in extras if e))
    print(f"recorded wall time of these steps together: {total / 3600:.1f} h")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", action="extend", metavar="NAME", help="run only these steps (in dependency order)")
    parser.add_argument("--skip", nargs="+", action="extend", metavar="NAME", help="leave these steps out")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    parser.add_argument("--keep-going", action="store_true", help="run the remaining steps after a failure")
    parser.add_argument("--note", default=None, help=f"stored as `note` in every result (sets ${NOTE_ENV})")
    args = parser.parse_args(argv)
    steps = selected(args.only, args.skip)
    if args.list:
        list_steps(steps)
        return 0
    if args.dry_run:
        for step in steps:
            print(shlex.join(step.command))
        return 0
    outcomes: list[Outcome] = []
    for step in steps:
        failed_before = {o.step for o in outcomes if o.status != "done"}
        if set(step.after) & failed_before:
            outcomes.append(Outcome(step.name, "skipped", detail=[f"after {', '.join(set(step.after) & failed_before)}, which did not finish"]))
            continue
        outcome = run_step(step, args.note)
        outcomes.append(outcome)
        if outcome.status == "failed" and not args.keep_going:
            break
    print("\n== results")
    for o in outcomes:
        print(f"{o.step}: {o.status}" + (f" in {o.seconds:.0f} s" if o.seconds else "") + (f" ({'; '.join(o.detail)})" if o.detail else ""))
    not_run = [s.name for s in steps if s.name not in {o.step for o in outcomes}]
    if not_run:
        print(f"not run after the failure: {', '.join(not_run)}")
    return 1 if any(o.status == "failed" for o in outcomes) or not_run else 0


if __name__ == "__main__":
    sys.exit(main())
