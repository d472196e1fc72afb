"""The seeds' table on MMLU-Pro replay: every policy through the whole pipeline (router, planner,
simulated tiered loading, replay experts, aggregator) on the test split of the 29 recorded models.

    OMP_NUM_THREADS=2 python -m evals.run_replay_table [--dataset mmlu_pro] [--batch-sizes 64,256] [--limit N]

Per policy: accuracy, mean active parameters per query, and the simulated GPU-seconds spent
loading experts (bytes over tier bandwidths, H100-host defaults) for planned batches (each batch's
experts loaded once, resident first) against the naive per-request order (batches of one, the
same pipeline). Each run starts cold (every expert on disk). Routers route on predicted quality
alone (load penalty 0: evals/bench_residency.py measures the penalty) with the options the router
table tuned (`--routers`, evals/results/routers by default), and the table sets each policy's
accuracy beside that table's offline accuracy for the same router. Writes table.md,
summary.json and plots to `--out` (evals/results/replay/); the per-item records go to `--runs`
(evals/runs/replay/, not committed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from evals.outcomes import load_outcomes, spread_rows
from evals.plots import finish, pyplot
from evals.provenance import RESULTS, add_note_argument, module_program, stamp
from evals.replay import REPLAY_POLICIES, TUNED, replay_pipeline, table_result, trace_disagreements, undisclosed_models
from evals.report import compare, plot_categories, plot_cost_accuracy
from evals.runner import PipelineTarget, RunConfig, run_benchmark

OUT = RESULTS / "replay"
RUNS = RESULTS.parent / "runs" / "replay"
POLICIES = ["single_best", "coe", "symbolic", "glider", "knn", "random", "oracle"]
NAIVE = 1
BF16_BYTES_PER_PARAM = 2


def offline_reference(dataset: str, routers: Path) -> tuple[dict[str, float], dict | None, int | None]:
    """The same routers' accuracy from the offline evaluation (the router table's results), that
    run's provenance, and how many test questions it scored."""
    path = routers / f"{dataset}.json"
    if not path.is_file():
        return {}, None, None
    results = json.loads(path.read_text())
    reference = {"single_best": results[0]["best_single_accuracy"], "oracle": results[0]["oracle_accuracy"],
                 "random": results[0]["random_accuracy"]}
    for policy, (router, k) in REPLAY_POLICIES.items():
        if (result := table_result(results, router, k)) is not None:
            reference[policy] = result["accuracy"]
    summary = routers / "summary.json"
    source = json.loads(summary.read_text()).get("provenance") if summary.is_file() else None
    return reference, source, results[0].get("n_test")


def run_table(dataset: str, batch_sizes: list[int], policies: list[str], limit: int | None = None,
              routers: Path = TUNED, runs: Path = RUNS, train_limit: int | None = None) -> dict:
    started = time.perf_counter()
    pipeline, test_ids = replay_pipeline(dataset, policies, default_policy="coe" if "coe" in policies else policies[0],
                                         progress=True, tuned=routers, train_limit=train_limit)
    fit_seconds = time.perf_counter() - started
    for router in pipeline.routers.values():
        # Quality-only routing: planned and naive batches then route alike and the table compares
        # their loads alone, against the offline table's accuracy (bench_residency sweeps the penalty).
        router.load_penalty = 0.0
    test = load_outcomes(f"{dataset}:test")
    rows_taken = spread_rows(len(test.data.ids), limit)
    test = test.take(rows_taken)
    only_ids = set(test.data.ids) & test_ids
    shutil.rmtree(runs, ignore_errors=True)
    target = PipelineTarget(pipeline)
    rows = []
    for policy in policies:
        row = {"policy": policy, "router": REPLAY_POLICIES[policy][0], "k": REPLAY_POLICIES[policy][1]}
        for size in [*batch_sizes, NAIVE]:
            pipeline.backend.reset()
            label = "naive" if size == NAIVE else f"batch{size}"
            run_started = time.perf_counter()
            config = RunConfig(benchmark=dataset, policy=policy, replay=dataset, batch_size=size)
            summary = run_benchmark(config, runs / label / policy, target=target, only_ids=only_ids, progress=False)
            stats = pipeline.backend.pool.stats()
            row[label] = {"accuracy": summary["accuracy"], "load_seconds": sum(stats.seconds.values()), "loads": stats.loads,
                          "evictions": stats.evictions, "bytes_moved": stats.bytes_moved, "seconds_per_move": stats.seconds,
                          "wall_seconds": time.perf_counter() - run_started}
            if size == batch_sizes[-1]:
                row.update(items=summary["items"], accuracy=summary["accuracy"], mean_active_params_b=summary["mean_active_params"] / 1e9,
                           expert_calls=summary["expert_calls"], categories={c: v["accuracy"] for c, v in summary["categories"].items()})
            print(f"{policy} {label}: accuracy {summary['accuracy']:.4f}, simulated load {row[label]['load_seconds']:.0f} s in {stats.loads} loads, "
                  f"{time.perf_counter() - run_started:.1f} s", flush=True)
        rows.append(row)
    backend = pipeline.backend
    tiers = {"device_bytes": backend.budgets.device, "host_bytes": backend.budgets.host,
             "host_to_device_gbps": backend.mover.host_to_device_gbps, "disk_to_host_gbps": backend.mover.disk_to_host_gbps}
    largest = max(pipeline.catalog.experts, key=lambda e: e.size_bytes)
    offline, offline_source, offline_questions = offline_reference(dataset, routers)
    everything = load_outcomes(dataset)
    comparable = offline_questions == len(test.data.ids)  # the same questions (a --limit run covers fewer)
    return {"dataset": dataset, "batch_sizes": batch_sizes, "tiers": tiers, "limit": limit, "train_limit": train_limit,
            "test_questions": len(test.data.ids), "test_split_questions": len(test_ids),
            "experts": len(pipeline.catalog.experts), "fit_seconds": fit_seconds, "rows": rows,
            "largest_expert": {"name": largest.name, "params_b": largest.size_bytes / 1e9,
                               "bf16_bytes": largest.size_bytes * BF16_BYTES_PER_PARAM},
            "undisclosed_models": undisclosed_models(dataset, everything.data.experts),
            "trace_disagreements": {"all": trace_disagreements(everything), "test": trace_disagreements(test)},
            "offline_accuracy": offline, "offline_source": offline_source, "offline_test_questions": offline_questions,
            "consistency": consistency(rows, offline, trace_disagreements(test)["questions_with_disagreement"],
                                       len(test.data.ids)) if comparable else None,
            "seconds": time.perf_counter() - started}


def consistency(rows: list[dict], offline: dict[str, float], disagreeing_questions: int, questions: int) -> dict:
    """Replay against offline accuracy for the k = 1 policies: a router that picks the same
    experts in both can differ only on the questions whose recorded letter and outcome disagree.
    (Symbolic-MoE's vote differs by design: offline a model without a recorded letter abstains.)"""
    differences = {r["policy"]: r["accuracy"] - offline[r["policy"]] for r in rows if r["k"] == 1 and r["policy"] in offline}
    bound = disagreeing_questions / questions if questions else 0.0
    largest = max((abs(d) for d in differences.values()), default=0.0)
    return {"differences": differences, "bound": bound, "largest": largest, "within_bound": largest <= bound + 1e-12}


def write_outputs(result: dict, out: Path = OUT, runs: Path = RUNS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    largest = f"batch{result['batch_sizes'][-1]}"
    summaries, _ = compare([runs / largest / row["policy"] for row in result["rows"]], None)
    plot_categories(summaries, out / "category_accuracy.png", f"{result['dataset']} replay (test split): accuracy per category by policy")
    plot_cost_accuracy(summaries, out / "cost_accuracy.png", f"{result['dataset']} replay: cost vs accuracy ({largest})")
    plot_loads(result, out / "load_seconds.png")
    (out / "table.md").write_text(table_markdown(result))


def plot_loads(result: dict, path: Path) -> None:
    plt = pyplot()
    import numpy as np

    labels = [f"batch{b}" for b in result["batch_sizes"]] + ["naive"]
    policies = [r["policy"] for r in result["rows"]]
    x = np.arange(len(policies))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for n, label in enumerate(labels):
        ax.bar(x + n * width - 0.4 + width / 2, [r[label]["load_seconds"] for r in result["rows"]], width,
               label="naive per-request order" if label == "naive" else f"planned, batches of {label[5:]}")
    ax.set_yscale("log")
    ax.set_xticks(x, policies)
    ax.set_ylabel("simulated GPU-seconds loading experts (log)")
    finish(fig, ax, path, f"{result['dataset']} replay: load time, planned batches vs naive order", grid_axis="y")


def _count(n: int) -> str:
    return f"{n:,}"


def table_markdown(result: dict) -> str:
    t = result["tiers"]
    sizes = result["batch_sizes"]
    provenance = result.get("provenance", {})
    head = ("| policy | k | accuracy | offline accuracy | mean active params (B) | "
            + " | ".join(f"load s, batches of {b}" for b in sizes) + " | load s, naive | naive / planned | loads (planned / naive) |")
    questions = (f"the test split ({result['test_questions']} questions)" if result["test_questions"] == result["test_split_questions"]
                 else f"{result['test_questions']} questions spread over the test split of {result['test_split_questions']}")
    lines = [f"# Seeds' table on {result['dataset']} replay", "",
             f"Regenerate with `{provenance.get('command', 'python -m evals.run_replay_table')}` "
             f"({result['seconds']:.0f} s, routers fitted in {result['fit_seconds']:.0f} s; machine and commit in summary.json). "
             f"{result['experts']} replay experts, {questions}; routers fitted on "
             + (f"{result['train_limit']} questions spread over " if result.get("train_limit") else "")
             + "the train split with the options tuned in "
             "[../routers/table.md](../routers/table.md).", "",
             head, "|---|" + "---|" * (head.count("|") - 2)]
    offline = result["offline_accuracy"]
    largest = f"batch{sizes[-1]}"
    for r in result["rows"]:
        planned = r[largest]["load_seconds"]
        cells = [r["policy"], str(r["k"]), f"{r['accuracy']:.4f}",
                 f"{offline[r['policy']]:.4f}" if r["policy"] in offline else "—", f"{r['mean_active_params_b']:.1f}"]
        cells += [f"{r[f'batch{b}']['load_seconds']:.0f}" for b in sizes]
        cells += [f"{r['naive']['load_seconds']:.0f}", f"{r['naive']['load_seconds'] / planned:.1f}x" if planned else "—",
                  f"{r[largest]['loads']} / {r['naive']['loads']}"]
        lines.append("| " + " | ".join(cells) + " |")
    big = result["largest_expert"]
    fits_bf16 = big["bf16_bytes"] <= t["device_bytes"]
    voters = sorted({r["k"] for r in result["rows"] if r["k"] > 1})
    disagree, check = result["trace_disagreements"], result["consistency"]
    source = result.get("offline_source") or {}
    lines += [
        "", "![load seconds](load_seconds.png)", "", "![cost vs accuracy](cost_accuracy.png)", "",
        "![per category](category_accuracy.png)", "",
        "## How it is measured", "",
        "- Every query runs through `Pipeline.run`: the policy's router, the planner (one group per expert, resident experts "
        "first), loading, the replay backend (experts/backends/replay.py) and the aggregator"
        + (f" (Symbolic-MoE: weighted vote of k = {', '.join(map(str, voters))})" if voters else "") + ". A replay expert "
        "answers the model's recorded letter; where none was recorded, the gold letter if its outcome is correct, else a "
        "fixed wrong letter.",
        f"- Load time is simulated by the tiered pool (experts/pool.py) with its SimulatedMover: bytes = total parameters "
        f"in FP8 (1 byte each; the largest expert, {big['name']} at {big['params_b']:.0f}B parameters, would take "
        f"{big['bf16_bytes'] / 1e9:.0f} GB in bf16, {'within' if fits_bf16 else 'beyond'} the device budget), "
        f"disk -> host at {t['disk_to_host_gbps']:.0f} GB/s, host <-> device at {t['host_to_device_gbps']:.0f} GB/s, device "
        f"budget {t['device_bytes'] / 1e9:.0f} GB, host budget {t['host_bytes'] / 1e9:.0f} GB; eviction by the plan (Belady), "
        "else least recently used. The seconds count every move, offloads to host included. Each run starts cold (every "
        "expert on disk)."
        + (f" Models of undisclosed size ({', '.join(result['undisclosed_models'])}) are hosted APIs: they hold no memory "
           "here (their loads take 0 s) and count at the default cost of evals/outcomes.py (API_DEFAULT_ACTIVE_PARAMS_B) "
           "in the active parameters." if result["undisclosed_models"] else ""),
        "- Planned: the questions in arrival order, in batches; each batch's experts load once. Naive: the same pipeline "
        "with batches of one, so an expert loads whenever the previous requests evicted it.",
        "- Mean active parameters per query: the sum over the experts called (k of them) of active parameters per token.",
        "- Offline accuracy: the same router on the recorded outcome matrix, from the router table"
        + (f" run of {source['started_at']} (commit {str(source.get('commit', {}).get('sha'))[:10]})" if source.get("started_at") else "")
        + f". Replay scores the recorded letters, which disagree with the recorded outcome on "
        f"{_count(disagree['all']['disagreeing_pairs'])} of {_count(disagree['all']['pairs_with_letter'])} (model, question) "
        f"pairs ({disagree['test']['disagreeing_pairs']} here, on {disagree['test']['questions_with_disagreement']} questions). "
        + (f"For the k = 1 policies the largest difference between the two columns is {check['largest']:.4f}, "
           + ("within" if check["within_bound"] else "BEYOND") + f" the {check['bound']:.4f} those questions allow"
           + ("" if check["within_bound"] else ": replay and offline evaluation route differently") + "."
           if check else f"The offline column scores the router table's {result['offline_test_questions']} test questions, "
           f"this run {result['test_questions']}: the two columns are not comparable row by row.")
        + (" Symbolic-MoE's vote differs by design: offline a model with no recorded letter abstains, in replay it "
           "answers (gold or the fixed wrong letter)." if voters else ""),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mmlu_pro")
    parser.add_argument("--batch-sizes", default="64,256", help="planned batch sizes, comma-separated (the last is the table's)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--limit", type=int, default=None, help="this many test questions, evenly spread (default: all)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="fit the routers on this many training questions, evenly spread (default: all; small runs)")
    parser.add_argument("--routers", type=Path, default=TUNED, help="the router table's results (tuned options, offline accuracy)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--runs", type=Path, default=RUNS, help="per-item records of every run (not committed)")
    add_note_argument(parser)
    args = parser.parse_args(argv)
    result = run_table(args.dataset, [int(b) for b in args.batch_sizes.split(",")], args.policies.split(","), args.limit,
                       args.routers, args.runs, args.train_limit)
    stamp(result, args=args, argv=argv, program=module_program(__spec__), backend="replay")
    write_outputs(result, args.out, args.runs)
    print(json.dumps({r["policy"]: {"accuracy": r["accuracy"], "mean_active_params_b": r["mean_active_params_b"],
                                    **{k: r[k]["load_seconds"] for k in r if k.startswith("batch") or k == "naive"}}
                      for r in result["rows"]}, indent=1))
    return result


if __name__ == "__main__":
    main()
