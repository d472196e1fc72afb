"""Batch-1 routing latency with the embedding, every router in one process, interleaved query by
query so that load from other processes hits them alike; knn (today's default) is the baseline.

    python -m evals.bench_route_latency [--queries 500] [--routers knn,cluster,mf,dc,best] [--out PATH]

evals/regenerate.py runs it before the router table, whose prose quotes it.

Routers are fitted on MMLU-Pro train with their defaults (dc: its cached encoder); each query of
MMLU-Pro test is embedded live (ONNX int8, 2 threads) and routed. Prints a JSON summary: p50 and
p90 per router, the ratio to knn's p50, and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np

from evals.outcomes import load_outcomes
from evals.provenance import add_note_argument, module_program, write_summary
from evals.router_eval import embedder_for, embeddings_for, make_router
from routers.base import RoutingDataWarning

OUT = Path(__file__).resolve().parent / "results" / "bench_route_latency.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--routers", default="knn,cluster,mf,dc,best")
    parser.add_argument("--out", type=Path, default=OUT)
    add_note_argument(parser)
    args = parser.parse_args(argv)
    names = args.routers.split(",")
    train, test = load_outcomes("mmlu_pro:train"), load_outcomes("mmlu_pro:test")
    vectors = embeddings_for(train)
    routers = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutingDataWarning)
        for name in names:
            router = make_router(name, {}, train.cost_table).fit(train.data, vectors)
            router.embed = embedder_for(router.encoder).embed  # live embedding, as a request has it
            router.route(test.data.texts[:1])  # warm-up: loads the embedder
            routers[name] = router
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in names}
    for text in test.data.texts[: args.queries]:
        for name, router in routers.items():
            started = time.perf_counter()
            router.route([text])
            times[name].append(time.perf_counter() - started)
    summary = {
        "queries": args.queries, "threads": 2, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "routers": {name: {"p50_ms": float(np.median(t) * 1000), "p90_ms": float(np.quantile(t, 0.9) * 1000)} for name, t in times.items()},
    }
    if "knn" in summary["routers"]:
        for stats in summary["routers"].values():
            stats["p50_vs_knn"] = stats["p50_ms"] / summary["routers"]["knn"]["p50_ms"]
    return write_summary(summary, args.out, args=args, argv=argv, program=module_program(__spec__))


if __name__ == "__main__":
    main()
