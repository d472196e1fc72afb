"""Serve overhead: the same queries in-process through the pipeline and over HTTP through Serve.

    python -m evals.bench_serve [--clients 1 8 32] [--max-tokens 8] [--rounds 5] [--backend auto] [--out evals/results/bench_serve.json]

Per number of concurrent clients, three ways to answer the same questions (held-out questions of
every expert's task, greedy, max_tokens small so that overhead is visible):
- `inproc_calls`: each client thread calls Pipeline.run([query]) on one in-process pipeline;
- `inproc_batched`: Pipeline.run on batches of `clients` queries;
- `http`: each client posts to /v1/chat/completions of the real local Serve app (the ingress,
  routing in its own process with @serve.batch -> multiplexed expert pool), keep-alive connections.
HTTP is compared with the better of the two in-process ways at each level, named in the result:
`fastest_inproc` (throughput) and `lowest_latency_inproc` (p50), so no ratio rests on the weaker
baseline. Prints JSON: latency p50/p99 and throughput of each, the added p50/p99 latency of HTTP
over the lower in-process one, HTTP throughput as a ratio of the faster in-process one (and of
each), all from one run. Each way is measured in `--rounds` blocks per level (the levels in turn
within a round; the two in-process ways taking turns, evals/rounds.py): the figures pool every
round's requests, and `rounds` per level keeps each round's HTTP ratio and added p50 against the
same round of the baseline named (the spread). The two sides run one after the other, not in
turns (they would share the CPU), so the spread is each side's own noise, not drift between them.
`outside_pipeline_p50_ms` is measured per request, without the noise of two generation-time
distributions: client latency minus the engine's own pipeline time (`coe.timings.total`), i.e.
HTTP, proxy, the ingress's FastAPI app and the batching wait (the hop to the pool is inside the
pipeline's generate time).
Both sides run the same backend (`--backend`; `auto`: vLLM where installed, as `coe serve` does);
the in-process one is shut down before Serve starts, so the two never share the CPU.

Each side is measured in the same steady state: a warm-up of the pool's hot-rule window of routed
requests (not counted), a wait until the pool has no full copy on its way up or down (its hot
experts promoted, evals/pools.py), and a short warm-up of the new engines; the result says per
side how long that took and whether the pool stayed put while measured (`pools.<side>`). Without
it, engines the hot rule starts mid-run land on the same cores at different moments on each side.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from evals import pools
from evals.bench_load import questions
from evals.provenance import add_note_argument, module_program, write_summary
from evals.rounds import spread, turns


def _stats(blocks: list[dict]) -> dict:
    """Latency percentiles over every block's requests; throughput over their summed wall time."""
    arr = np.array([x for block in blocks for x in block["latencies"]])
    return {"p50_ms": round(float(np.percentile(arr, 50)) * 1000, 1), "p99_ms": round(float(np.percentile(arr, 99)) * 1000, 1),
            "throughput_rps": round(len(arr) / sum(block["wall"] for block in blocks), 2)}


def run_clients(fn, items: list, clients: int) -> dict:
    """One block: `clients` threads answer the items between them; per request the latency."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(item):
        started = time.perf_counter()
        fn(item)
        with lock:
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, items))
    return {"latencies": latencies, "wall": time.perf_counter() - started}


def run_batched(pipeline, queries: list, clients: int) -> dict:
    latencies: list[float] = []
    started = time.perf_counter()
    for i in range(0, len(queries), clients):
        t = time.perf_counter()
        batch = queries[i:i + clients]
        pipeline.run(batch)
        latencies += [time.perf_counter() - t] * len(batch)
    return {"latencies": latencies, "wall": time.perf_counter() - started}


ENGINES_WARMUP = 16  # requests for the promoted engines' first shapes, after the pool settled


def warm_up_texts(texts: list[str], n: int) -> list[str]:
    return [texts[i % len(texts)] for i in range(n)]


WAYS = ("inproc_calls", "inproc_batched", "http")


def compare_levels(blocks: dict[tuple[str, int], list[dict]], levels: dict) -> dict:
    """Per level: each way's figures over every round, and HTTP against the faster in-process way
    (throughput) and the lower one (latency), pooled and per round (`rounds`: the spread)."""
    results = {}
    for c in levels:
        r = {name: _stats(blocks[name, c]) for name in WAYS}
        inproc = {name: r[name] for name in ("inproc_calls", "inproc_batched")}
        fastest = max(inproc, key=lambda name: inproc[name]["throughput_rps"])
        quickest = min(inproc, key=lambda name: inproc[name]["p50_ms"])
        r["fastest_inproc"] = fastest
        r["lowest_latency_inproc"] = quickest
        r["http_throughput_vs_fastest_inproc"] = round(r["http"]["throughput_rps"] / inproc[fastest]["throughput_rps"], 3)
        r["added_p50_ms"] = round(r["http"]["p50_ms"] - inproc[quickest]["p50_ms"], 1)
        r["added_p99_ms"] = round(r["http"]["p99_ms"] - inproc[quickest]["p99_ms"], 1)
        r["http_throughput_vs_inproc_batched"] = round(r["http"]["throughput_rps"] / r["inproc_batched"]["throughput_rps"], 3)
        r["http_throughput_vs_inproc_calls"] = round(r["http"]["throughput_rps"] / r["inproc_calls"]["throughput_rps"], 3)
        per_round = [{name: _stats([block]) for name, block in zip(WAYS, round_blocks)}
                     for round_blocks in zip(*(blocks[name, c] for name in WAYS))]
        r["rounds"] = {
            "http_throughput_vs_fastest_inproc": spread([x["http"]["throughput_rps"] / x[fastest]["throughput_rps"] for x in per_round]),
            "added_p50_ms": spread([x["http"]["p50_ms"] - x[quickest]["p50_ms"] for x in per_round], digits=1),
        }
        r["queries"] = len(levels[c])
        results[str(c)] = r
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=4, help="queries per client (at least --min-queries per level)")
    parser.add_argument("--min-queries", type=int, default=24, help="queries per level at least")
    parser.add_argument("--rounds", type=int, default=5, help="measured blocks per way and level (the spread)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--backend", default="auto", help="expert backend on both sides (auto: vllm where installed)")
    parser.add_argument("--no-expert-pools", action="store_true",
                        help="serve.expert_pools false: the ingress runs the experts itself (one process and one hop fewer)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="routed requests per side before the wait for the pool (default: its hot rule's window)")
    parser.add_argument("--settle-timeout", type=float, default=900, help="longest wait for the pool's promotions")
    parser.add_argument("--out", type=Path, default=Path("evals/results/bench_serve.json"))
    add_note_argument(parser)
    args = parser.parse_args(argv)

    from core.config import CoeConfig
    from core.types import GenerationParams, Query
    from experts.backends import resolve_backend_name
    from experts.backends.base import pool_report
    from orchestrator.pipeline import Pipeline

    config = CoeConfig.model_validate({"serve": {"num_cpus": 2, "expert_pools": not args.no_expert_pools},
                                       "backend": {"name": args.backend}})
    texts = questions()
    params = GenerationParams(max_tokens=args.max_tokens)
    levels = {c: texts[: max(args.min_queries, c * args.per_client)] for c in args.clients}

    pipeline = Pipeline.from_config(config)

    def answer_inproc(text: str) -> None:
        pipeline.run([Query.from_text(text, params=params)])

    def inproc_reports() -> list[dict]:
        return [pool_report(pipeline.backend)]

    window = args.warmup if args.warmup is not None else config.pool.hot.window
    settled = pools.settle(lambda n: run_clients(answer_inproc, warm_up_texts(texts, n), 8), inproc_reports, window,
                           ENGINES_WARMUP, args.settle_timeout)
    blocks: dict[tuple[str, int], list[dict]] = {(name, c): [] for name in WAYS for c in levels}
    for round_ in range(args.rounds):
        for c, items in levels.items():
            for name in turns(("inproc_calls", "inproc_batched"), round_):
                blocks[name, c].append(run_clients(answer_inproc, items, c) if name == "inproc_calls" else
                                       run_batched(pipeline, [Query.from_text(t, params=params) for t in items], c))
    pool_states = {"inproc": pools.stayed_put(settled, inproc_reports)}
    if hasattr(pipeline.backend, "shutdown"):  # a vLLM engine process: gone before Serve starts its own
        pipeline.backend.shutdown()
    del pipeline

    from deploy.app import start, stop

    url = start(config, host="127.0.0.1", port=args.port)
    local = threading.local()
    outside_pipeline: dict[int, list[float]] = {c: [] for c in levels}  # per request: latency minus the pipeline's time

    def post(text: str, outside: list[float] | None = None) -> None:
        client = getattr(local, "client", None) or httpx.Client(timeout=300)
        local.client = client
        started = time.perf_counter()
        reply = client.post(f"{url}/v1/chat/completions",
                            json={"model": "coe", "max_tokens": args.max_tokens, "messages": [{"role": "user", "content": text}]})
        reply.raise_for_status()
        if outside is not None:
            outside.append(time.perf_counter() - started - reply.json()["coe"]["timings"]["total"])

    def http_reports() -> list[dict]:
        return pools.pool_reports(url)

    try:
        settled = pools.settle(lambda n: run_clients(post, warm_up_texts(texts, n), 8), http_reports, window,
                               ENGINES_WARMUP, args.settle_timeout)
        for round_ in range(args.rounds):
            for c, items in levels.items():
                blocks["http", c].append(run_clients(functools.partial(post, outside=outside_pipeline[c]), items, c))
        pool_states["http"] = pools.stayed_put(settled, http_reports)
    finally:
        stop()

    results = compare_levels(blocks, levels)
    for c in levels:
        results[str(c)]["http"]["outside_pipeline_p50_ms"] = round(float(np.percentile(outside_pipeline[c], 50)) * 1000, 1)
    backend = resolve_backend_name(args.backend)
    summary = {"max_tokens": args.max_tokens, "backend": backend, "rounds": args.rounds,
               "graph": "ingress (routes) -> expert pool" if config.serve.expert_pools else "ingress (routes, experts inside)",
               "levels": results, "pools": pool_states,
               "steady": all(pools.steady(state) for state in pool_states.values())}
    first, eight = results.get("1"), results.get("8")
    summary["targets"] = {  # the serving path's goals, checked against this run
        "added_p50_ms_at_1_client_below": 10, "met_added_p50_ms_at_1_client": first["added_p50_ms"] < 10 if first else None,
        "http_throughput_vs_fastest_inproc_at_8_at_least": 0.9,
        "met_http_throughput_at_8": eight["http_throughput_vs_fastest_inproc"] >= 0.9 if eight else None,
    }
    return write_summary(summary, args.out, args=args, argv=argv, program=module_program(__spec__), backend=backend)


if __name__ == "__main__":
    main()
