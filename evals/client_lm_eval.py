"""lm-evaluation-harness as a client of coe: a benchmark's items, as a task defined over a local
JSON Lines file, run by `lm_eval --model local-chat-completions` against a live coe (the HTTP app
served by uvicorn over the same in-process pipeline), and the same items through the in-process
`coe eval run` (evals/runner.py) at temperature 0. Prints and writes a JSON summary: both
accuracies, and the items whose extracted answers differ (the target is at most 2 of 100).

    python -m evals.client_lm_eval --benchmark arc_challenge --limit 100 \
        --json evals/results/clients/lm_eval_arc_challenge.json

lm-eval comes from the `clients` extra (`pip install -e .[clients]`). Both runs share one
pipeline (one copy of the weights); the items are the sample `coe eval run --limit` takes, the
prompt is the one it sends (core/prompts.eval_prompt), and lm-eval's answers are scored with
coe's own extraction (evals/scoring.py) through the task's process_results. In float32 (the
default) the two runs agree answer for answer; in bfloat16 a greedy answer depends on what else
is in its batch (padding, and peft's mixed-adapter path), and 17 of 100 differed in one run
while both scored 0.29.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from evals.provenance import add_note_argument, module_program, write_summary

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{gold}}}}"
process_results: !function coe_task.process_results
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: {max_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

# The task's process_results: coe's answer extraction on lm-eval's generation.
TASK_CODE = '''from core.data import Item
from evals.scoring import score


def process_results(doc, results):
    scored = score(Item.model_validate(doc["item"]), results[0], doc["kind"])
    return {"exact_match": float(bool(scored.correct))}
'''


def serve_in_thread(app, port: int):
    """The app on 127.0.0.1:port (uvicorn) in a daemon thread; returns the server (should_exit stops it)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the coe app did not start")
        time.sleep(0.05)
    return server


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="arc_challenge")
    parser.add_argument("--policy", default="coe")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8, help="lm-eval's num_concurrent (requests in flight)")
    parser.add_argument("--batch-size", type=int, default=16, help="coe eval run's batch size")
    parser.add_argument("--dtype", default="float32", help="the hf backend's dtype for both runs")
    parser.add_argument("--json", type=Path, help="write the summary here")
    add_note_argument(parser)
    args = parser.parse_args(argv)

    from core.config import load_config
    from deploy.server import LocalPipelineClient, build_api
    from evals.benchmarks import get_benchmark
    from evals.runner import PipelineTarget, Runner, run_benchmark
    from evals.store import RESULTS_FILE, RunConfig
    from orchestrator.pipeline import Pipeline

    settings = load_config(None)
    settings.backend.name = "hf"  # what the in-process `coe eval run` runs on
    settings.backend.options = {**settings.backend.options, "dtype": args.dtype}
    pipeline = Pipeline.from_config(settings)
    benchmark = get_benchmark(args.benchmark)
    work = Path(tempfile.mkdtemp(prefix="coe-lm-eval-"))
    config = RunConfig(benchmark=args.benchmark, policy=args.policy, limit=args.limit, batch_size=args.batch_size)
    target = PipelineTarget(pipeline)
    items = Runner(config, target, work / "coe-run").items()

    started = time.perf_counter()
    summary_coe = run_benchmark(config, work / "coe-run", target=target, progress=False)
    coe_seconds = time.perf_counter() - started
    records = {json.loads(line)["id"]: json.loads(line) for line in (work / "coe-run" / RESULTS_FILE).read_text().splitlines()}

    port = free_port()
    server = serve_in_thread(build_api(LocalPipelineClient(pipeline)), port)
    started = time.perf_counter()
    try:
        lm_accuracy, texts, command = run_lm_eval(f"http://127.0.0.1:{port}/v1", args.policy, items, benchmark.kind,
                                                  benchmark.max_tokens, args.concurrency, work)
    finally:
        server.should_exit = True
        pipeline.close()
    lm_eval_seconds = time.perf_counter() - started

    from evals.scoring import score

    differing = []
    for item in items:
        theirs = score(item, texts[item.id], benchmark.kind).predicted
        ours = records[item.id]["predicted"]
        if theirs != ours:
            differing.append({"id": item.id, "lm_eval": theirs, "coe_eval_run": ours})
    summary = {
        "benchmark": args.benchmark, "policy": args.policy, "items": len(items), "dtype": args.dtype,
        "lm_eval": {"accuracy": lm_accuracy, "seconds": round(lm_eval_seconds, 1), "version": _version("lm_eval"),
                    "command": command,
                    "concurrency": args.concurrency},
        "coe_eval_run": {"accuracy": summary_coe["accuracy"], "seconds": round(coe_seconds, 1), "batch_size": args.batch_size},
        "differing_answers": len(differing), "differing": differing, "target": "at most 2 of 100 answers differ",
    }
    return write_summary(summary, args.json, args=args, argv=argv, program=module_program(__spec__), backend=f"hf {args.dtype}")


def run_lm_eval(url: str, model: str, items, kind: str, max_tokens: int, concurrency: int, work: Path):
    """`lm_eval --model local-chat-completions` on a task over the items (a JSON Lines file, the
    prompt exactly as `coe eval run` sends it) against the server at `url`; returns its accuracy
    (coe's scoring), each item's generated text by id, and the command."""
    from core.prompts import eval_prompt

    task = f"coe_{items[0].benchmark}"
    data = work / "items.jsonl"
    data.write_text("".join(json.dumps({"id": i.id, "prompt": eval_prompt(i, kind), "gold": i.answer, "kind": kind,
                                        "item": i.model_dump()}) + "\n" for i in items))
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data, max_tokens=max_tokens))
    (tasks / "coe_task.py").write_text(TASK_CODE)
    model_args = (f"model={model},base_url={url}/chat/completions,num_concurrent={concurrency},max_retries=1,"
                  "tokenized_requests=False")
    command = [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args", model_args,
               "--apply_chat_template", "--tasks", task, "--include_path", str(tasks), "--log_samples",
               "--output_path", str(work / "lm-eval")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                         cwd=Path(__file__).resolve().parent.parent)
    if run.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({run.returncode}):\n{run.stderr[-4000:]}")
    [results_file] = sorted((work / "lm-eval").rglob("results_*.json"))
    [samples_file] = sorted((work / "lm-eval").rglob(f"samples_{task}_*.jsonl"))
    accuracy = json.loads(results_file.read_text())["results"][task]["exact_match,none"]
    texts = {}
    for line in samples_file.read_text().splitlines():
        sample = json.loads(line)
        texts[sample["doc"]["id"]] = sample["resps"][0][0]
    shown = " ".join(["lm_eval", *command[3:]]).replace(str(work), "$WORK").replace(url, "$COE_URL")
    return accuracy, texts, shown


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
