"""The routing embedder's runtimes at batch 1 (a live request) on MMLU-Pro questions; prints one JSON object.

    python -m evals.bench_embedder [--queries 200] [--out evals/results/bench_embedder.json]

Every runtime of routers/embedder.py embeds the same test questions one at a time, after a
warm-up: p50 and p90 milliseconds per query, and the CPU milliseconds the process spent per query
(every thread's, over each block: what a router replica takes from the cores it shares with the
engines). Runtimes take turns in blocks (all questions, then the next runtime; `--rounds` times,
in a rotated order), so other load on the CPU hits all alike while one runtime's idle threads never
run beside another's.
The default runtime is compared with the fastest of the others (`default_vs_fastest_other`,
named), and its vectors with sentence-transformers' on torch (cosine per question: min and mean;
and whether each question's nearest other question is the same).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from evals.provenance import add_note_argument, module_program, write_summary

REFERENCE = "torch"  # sentence-transformers on torch: the vectors the others must match


def nearest(vectors: np.ndarray) -> np.ndarray:
    """Each unit vector's nearest other vector (its index): what a 1-NN router would look up."""
    similarity = vectors @ vectors.T - 2 * np.eye(len(vectors))
    return similarity.argmax(axis=1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200, help="MMLU-Pro test questions, evenly spread")
    parser.add_argument("--dataset", default="mmlu_pro:test")
    parser.add_argument("--rounds", type=int, default=3, help="blocks per runtime, taking turns")
    parser.add_argument("--out", type=Path, default=None)
    add_note_argument(parser)
    args = parser.parse_args(argv)

    from evals.outcomes import load_outcomes, spread_rows
    from routers.embedder import RUNTIMES, Embedder

    data = load_outcomes(args.dataset)
    texts = [data.data.texts[i] for i in spread_rows(len(data.data.texts), args.queries)]
    embedders = {runtime: Embedder(runtime=runtime) for runtime in RUNTIMES}
    default = Embedder().runtime
    for embedder in embedders.values():
        embedder.embed(texts[:2])  # warm-up: loads (and exports once) each runtime
    seconds: dict[str, list[float]] = {runtime: [] for runtime in embedders}
    cpu_seconds = dict.fromkeys(embedders, 0.0)
    vectors: dict[str, list[np.ndarray]] = {runtime: [] for runtime in embedders}
    order = list(embedders)
    for round_ in range(args.rounds):
        for runtime in order[round_ % len(order):] + order[:round_ % len(order)]:
            embedder = embedders[runtime]
            cpu_started = time.process_time()
            for text in texts:
                started = time.perf_counter()
                vector = embedder.embed([text])
                seconds[runtime].append(time.perf_counter() - started)
                if round_ == 0:
                    vectors[runtime].append(vector[0])
            cpu_seconds[runtime] += time.process_time() - cpu_started

    reference = np.stack(vectors[REFERENCE])
    runtimes = {}
    for runtime in embedders:
        ms = np.array(seconds[runtime]) * 1000
        stacked = np.stack(vectors[runtime])
        cosine = (stacked * reference).sum(axis=1)
        runtimes[runtime] = {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
                             "cpu_ms_per_query": round(1000 * cpu_seconds[runtime] / len(ms), 2),
                             "cosine_to_torch_min": round(float(cosine.min()), 4), "cosine_to_torch_mean": round(float(cosine.mean()), 4),
                             "same_nearest_question": round(float(np.mean(nearest(stacked) == nearest(reference))), 4)}
    others = {r: v for r, v in runtimes.items() if r != default}
    fastest_other = min(others, key=lambda r: others[r]["p50_ms"])
    summary = {
        "dataset": args.dataset, "queries": len(texts), "rounds": args.rounds,
        "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
        "batch": 1, "default": default, "runtimes": runtimes,
        "fastest_other": fastest_other,
        "default_vs_fastest_other_p50": round(runtimes[default]["p50_ms"] / runtimes[fastest_other]["p50_ms"], 3),
        "default_vs_torch_p50": round(runtimes[default]["p50_ms"] / runtimes[REFERENCE]["p50_ms"], 3),
    }
    return write_summary(summary, args.out, args=args, argv=argv, program=module_program(__spec__), backend=default)


if __name__ == "__main__":
    main()
