"""Regenerate the router results under evals/results/routers/: every router and baseline on
MMLU-Pro, LLMRouter and RouteLLM, the bounded LLM-extractor comparison and GLIDER's local gates
on the embedded LoRA pool.

    python -m evals.run_router_table [--only mmlu_pro] [--llm-sample 300] [--no-llm] [--no-pool] [--no-datasets]

Embeddings and LLM outputs are cached on disk (see routers/embedder.py, routers/llm_writer.py):
the first run embeds ~30k questions (tens of minutes on a CPU), later runs take minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from evals.outcomes import load_outcomes
from evals.provenance import stamp
from evals.router_eval import OfflineResult, evaluate_offline, plot_curves

OUT = Path(__file__).resolve().parent / "results" / "routers"
DATASETS = ("mmlu_pro", "llmrouter", "routellm")
RUNS = [("knn", None), ("coe", None), ("glider", None), ("symbolic", 1), ("symbolic", 3)]
LATENCY_DATASET = "mmlu_pro"


def row_of(result: OfflineResult, default_accuracy: float | None) -> dict:
    s = result.summary
    return {
        "router": s["router"], "k": s["k"], "accuracy": s["accuracy"], "cost": s["cost"],
        "vs_single_best": s["accuracy"] - s["best_single_accuracy"], "default_options_accuracy": default_accuracy,
        "apgr": s["apgr"], "cpt50": s["cpt50"], "cpt80": s["cpt80"], "options": s["options"],
        "route_ms_p50": s.get("route_ms_p50"), "route_ms_p50_batch64_no_embedding": s.get("route_ms_p50_batch64_no_embedding"),
    }


def run_dataset(name: str) -> dict:
    train, test = load_outcomes(f"{name}:train"), load_outcomes(f"{name}:test")
    results, rows = [], []
    for router, k in RUNS:
        started = time.perf_counter()
        tuned = evaluate_offline(router, train, test, k=k, latency=name == LATENCY_DATASET, progress=True)
        default = evaluate_offline(router, train, test, k=k, tune_options=False, latency=False)
        results.append(tuned)
        rows.append(row_of(tuned, default.summary["accuracy"]))
        print(f"{name} {router} k={tuned.summary['k']}: {tuned.summary['accuracy']:.4f} (defaults {default.summary['accuracy']:.4f}) "
              f"vs single best {tuned.summary['best_single_accuracy']:.4f}, cost {tuned.summary['cost']:.1f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    first = results[0].summary
    baselines = {
        "single_best": {"model": first["best_single"], "accuracy": first["best_single_accuracy"], "cost": first["best_single_cost"]},
        "oracle": {"accuracy": first["oracle_accuracy"], "cost": first["oracle_cost"]},
        "random": {"accuracy": first["random_accuracy"], "cost": first["random_cost"]},
        "weak": {"model": first["weak_model"], "accuracy": first["weak_accuracy"], "cost": first["weak_cost"]},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps([r.as_json() for r in results], indent=1))
    plot_curves(results, OUT / f"{name}.png", f"{name}: accuracy vs cost over the cost knob (test split)")
    return {"dataset": name, "n_train": first["n_train"], "n_test": first["n_test"], "experts": first["experts"],
            "baselines": baselines, "rows": rows}


def spread_sample(rows: int, size: int) -> np.ndarray:
    """Evenly spaced rows: the files are ordered by category, so a prefix would be one subject."""
    return np.unique(np.linspace(0, rows - 1, min(size, rows)).astype(int))


def run_llm_extractors(sample: int) -> dict:
    """Symbolic's skill extractors and GLIDER's instructions, embedding vs LLM, on the same bounded sample."""
    train, test = load_outcomes("mmlu_pro:train"), load_outcomes("mmlu_pro:test")
    test = test.take(spread_sample(len(test.data.texts), sample))
    rows = []
    for router, k, extractor in [("symbolic", 3, "embedding"), ("symbolic", 3, "llm"), ("symbolic", 1, "embedding"),
                                 ("symbolic", 1, "llm"), ("glider", 1, "query"), ("glider", 1, "llm")]:
        started = time.perf_counter()
        result = evaluate_offline(router, train, test, k=k, latency=False, progress=True, extractor=extractor)
        s = result.summary
        rows.append({"router": router, "k": k, "source": extractor, "accuracy": s["accuracy"],
                     "cost": s["cost"], "best_single_accuracy": s["best_single_accuracy"], "options": s["options"],
                     "seconds": time.perf_counter() - started})
        print(f"sample {router} k={k} {rows[-1]['source']}: {s['accuracy']:.4f} vs single best {s['best_single_accuracy']:.4f}", flush=True)
    return {"dataset": "mmlu_pro:test", "sample": len(test.data.texts), "rows": rows}


def run_pool_gates(per_task: int = 40) -> dict:
    """GLIDER on the embedded LoRA pool: share of held-out task questions routed to their expert,
    global router alone and with the local gates on SmolLM2 token states."""
    from core.catalog import load_catalog
    from core.prompts import user_prompt
    from evals.router_eval import cached_embed
    from experts.helpers import router_helpers
    from experts.tasks import TASKS
    from routers import build_router
    from routers.base import catalog_examples

    catalog = load_catalog()
    helpers = router_helpers(catalog)
    examples = catalog_examples(catalog, 300)
    vectors = cached_embed(examples.texts)
    expert_of = {e.tasks[0]: e.name for e in catalog.experts if e.kind == "lora" and e.tasks}
    questions = [(task, user_prompt(item)) for task in sorted(expert_of) for item in TASKS[task].heldout()[:per_task]]
    texts = [q for _, q in questions]
    rows = []
    for local_weight in (0.0, 0.5, 1.0):
        started = time.perf_counter()
        router = build_router("glider", helpers, embed=cached_embed, local_weight=local_weight,
                              fallback_expert=catalog.default_expert)
        router.fit(examples, vectors)
        fitted = time.perf_counter()
        decisions = router.route(texts, embeddings=cached_embed(texts))
        hits = [d.chosen[0].expert == expert_of[task] for d, (task, _) in zip(decisions, questions)]
        per_task_hits = {task: float(np.mean([h for h, (t, _) in zip(hits, questions) if t == task])) for task in sorted(expert_of)}
        rows.append({"local_weight": local_weight, "routed_to_own_expert": float(np.mean(hits)), "per_task": per_task_hits,
                     "fit_seconds": fitted - started, "route_seconds": time.perf_counter() - fitted})
        print(f"pool glider local_weight={local_weight}: {np.mean(hits):.3f} {per_task_hits}", flush=True)
    return {"questions": len(texts), "per_task": per_task, "rows": rows}


def fmt(value, digits=4):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(tables: list[dict], llm: dict | None, pool: dict | None) -> str:
    lines = ["# Routers on recorded outcomes", "",
             "Regenerate with `python -m evals.run_router_table`. Each router is fitted on the train "
             "split (options tuned on a validation split of train only) and scored on the test split; `defaults` is the "
             "same router with its constructor defaults, untuned. Cost = active parameters (billions) of the experts "
             "called per query; undisclosed API models cost 200 (evals/outcomes.py). k > 1 is a weighted vote: on MMLU-Pro "
             "replayed on the recorded answer letters, elsewhere the worst case (all wrong experts agree). APGR and CPT as "
             "RouteLLM defines them, over normalised cost between the cheapest expert (weak) and the single best (strong); "
             "CPT is the normalised cost (= call share to the strong model with two models) needed to recover 50% / 80% of "
             "the gap. Latency is measured on MMLU-Pro on a shared 2-core CPU.", ""]
    for table in tables:
        b = table["baselines"]
        lines += [f"## {table['dataset']} ({table['experts']} models; {table['n_train']} train / {table['n_test']} test)", "",
                  "| router | k | accuracy | vs single best | defaults | cost | APGR | CPT(50%) | CPT(80%) | route p50 ms (batch 1, with embedding) | ms/query (batch 64, no embedding) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in table["rows"]:
            lines.append(f"| {r['router']} | {r['k']} | {fmt(r['accuracy'])} | {r['vs_single_best']:+.4f} | {fmt(r['default_options_accuracy'])} | "
                         f"{fmt(r['cost'], 1)} | {fmt(r['apgr'], 3)} | {fmt(r['cpt50'], 3)} | {fmt(r['cpt80'], 3)} | "
                         f"{fmt(r['route_ms_p50'], 1)} | {fmt(r['route_ms_p50_batch64_no_embedding'], 3)} |")
        lines += [f"| single best ({b['single_best']['model']}) | 1 | {fmt(b['single_best']['accuracy'])} | +0.0000 | | {fmt(b['single_best']['cost'], 1)} | | | | | |",
                  f"| oracle (upper bound) | 1 | {fmt(b['oracle']['accuracy'])} | {b['oracle']['accuracy'] - b['single_best']['accuracy']:+.4f} | | {fmt(b['oracle']['cost'], 1)} | | | | | |",
                  f"| random | 1 | {fmt(b['random']['accuracy'])} | {b['random']['accuracy'] - b['single_best']['accuracy']:+.4f} | | {fmt(b['random']['cost'], 1)} | | | | | |",
                  f"| cheapest ({b['weak']['model']}) | 1 | {fmt(b['weak']['accuracy'])} | {b['weak']['accuracy'] - b['single_best']['accuracy']:+.4f} | | {fmt(b['weak']['cost'], 1)} | | | | | |",
                  "", f"![{table['dataset']}]({table['dataset']}.png)", ""]
    if llm:
        lines += [f"## LLM extractors vs embeddings (MMLU-Pro test, {llm['sample']} questions evenly spread over the split)", "",
                  "SmolLM2-135M-Instruct writes the skills (Symbolic-MoE) or the task instruction (GLIDER) for each test "
                  "question: about 0.5 s per question and writer on this CPU (batches of 16), run once and cached in the coe "
                  "cache dir; `seconds` is the evaluation with the cache warm. Profiles, task embeddings and tuning use the "
                  "training questions either way (running the LLM over them is out of reach on a CPU). The 135M model mostly "
                  "writes a sentence about the question rather than keywords, which is why it does not beat the embeddings.", "",
                  "| router | k | query side | accuracy | single best | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['router']} | {r['k']} | {r['source']} | {fmt(r['accuracy'])} | {fmt(r['best_single_accuracy'])} | {r['seconds']:.0f} |"
                  for r in llm["rows"]]
        lines.append("")
    if pool:
        lines += [f"## GLIDER on the embedded LoRA pool ({pool['questions']} held-out task questions)", "",
                  "Share routed to the expert trained on the question's task; local gates are logistic gates on "
                  "SmolLM2 hidden states (layer 10) of each expert's training questions.", "",
                  "| local weight | routed to own expert | per task | fit s | route s |", "|---|---|---|---|---|"]
        lines += [f"| {r['local_weight']} | {r['routed_to_own_expert']:.3f} | "
                  f"{', '.join(f'{t} {v:.2f}' for t, v in r['per_task'].items())} | {r['fit_seconds']:.0f} | {r['route_seconds']:.0f} |"
                  for r in pool["rows"]]
        lines.append("")
    lines += ["## Notes", "",
              "- With two models (RouteLLM) `symbolic` k = 3 calls both, and the worst-case vote cannot overturn the "
              "better-ranked one: it costs more for nothing, which is why its curve starts beyond the strong model's cost "
              "(APGR 0).",
              "- Without recorded answers (LLMRouter) a k = 3 vote is scored in the worst case for voting, so its gain "
              "there is a lower bound.",
              "- Batch-1 latency is mostly the query embedding: all-MiniLM-L6-v2 with int8 weights on ONNX Runtime, "
              "2 threads of this 2-core CPU (about 9 ms for a 120-token MMLU-Pro question with ten options, against 27 ms "
              "with sentence-transformers on torch); the routers' own work is the batch-64 column.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=DATASETS, action="append")
    parser.add_argument("--llm-sample", type=int, default=300)
    parser.add_argument("--no-llm", action="store_true")
    parser.add_argument("--no-pool", action="store_true")
    parser.add_argument("--no-datasets", action="store_true", help="only the LLM and pool sections")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for name in [] if args.no_datasets else args.only or DATASETS:
        summary[name] = run_dataset(name)
        summary_path.write_text(json.dumps(stamp(summary), indent=1))
    if not args.no_llm:
        summary["llm_extractors"] = run_llm_extractors(args.llm_sample)
        summary_path.write_text(json.dumps(stamp(summary), indent=1))
    if not args.no_pool:
        summary["pool_glider"] = run_pool_gates()
        summary_path.write_text(json.dumps(stamp(summary), indent=1))
    tables = [summary[name] for name in DATASETS if name in summary]
    (OUT / "table.md").write_text(markdown(tables, summary.get("llm_extractors"), summary.get("pool_glider")))


if __name__ == "__main__":
    main()
