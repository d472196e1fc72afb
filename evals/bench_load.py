"""Load test: many requests at many concurrent clients against the real local service, with an
expert made to fail part of the time; nothing may be lost.

    python -m evals.bench_load [--requests 2000] [--concurrency 16] [--rounds 5] [--fault-rate 0.1] [--out evals/results/load_report.json]

Starts coe on Serve on localhost with fault injection on (config `faults`), sends held-out
questions of every expert's task (so the faulty expert gets its share) with small max_tokens,
and prints a JSON summary: success rate, p50/p99 latency, answers that came from a fallback
expert, retries, status codes, and requests lost (no HTTP answer at all). The requests go in
`--rounds` blocks one after another: the figures pool them, and `rounds` keeps each block's
throughput and p50 latency (the spread). Bounded in count and time: past --max-seconds no new
request starts (those are reported as not sent, not lost).
What the pools did meanwhile (evals/pools.py): the moves they finished while the load ran (a hot
expert's merged engine starting on the same cores slows every request), the copies still on their
way at the end (`steady`: neither), and what each pool replica held.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from evals import pools
from evals.provenance import add_note_argument, module_program, write_summary
from evals.rounds import spread


def questions(limit: int = 300, max_chars: int = 200) -> list[str]:
    """Held-out questions of every task with an expert, interleaved; short ones only (prefill of
    long prompts dominates a CPU backend, and these benchmarks measure the service around it)."""
    from core.prompts import user_prompt
    from experts.tasks import TASKS

    per_task = [[q for q in map(user_prompt, task.heldout()) if len(q) <= max_chars][:limit] for task in TASKS.values()]
    return [q for group in zip(*per_task) for q in group]


def run_load(url: str, requests: int = 2000, concurrency: int = 16, max_tokens: int = 4, seed: int = 0,
             model: str = "coe", api_key: str | None = None, max_seconds: float = 600.0, timeout: float = 120.0,
             rounds: int = 1) -> dict:
    """`requests` chat requests from `concurrency` clients in `rounds` blocks one after another (the
    pooled figures, and each block's throughput and p50 in `rounds`: the spread); past
    `max_seconds` from the start no new request starts."""
    texts = questions()
    rng = np.random.default_rng(seed)
    order = rng.permutation(requests) % len(texts)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    local = threading.local()
    deadline = time.monotonic() + max_seconds

    def one(i: int) -> dict:
        if time.monotonic() > deadline:
            return {"sent": False}
        client = getattr(local, "client", None) or httpx.Client(timeout=timeout, headers=headers)
        local.client = client
        body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": texts[order[i]]}]}
        started = time.perf_counter()
        try:
            reply = client.post(f"{url}/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return {"sent": True, "status": None, "error": type(exc).__name__, "seconds": time.perf_counter() - started}
        record = {"sent": True, "status": reply.status_code, "seconds": time.perf_counter() - started}
        if reply.status_code == 200:
            coe = reply.json()["coe"]
            record.update(fallback=coe["fallback"], answered_by=coe["answered_by"],
                          retried=any(i["kind"] in ("error", "timeout") for i in coe["incidents"]),
                          nonempty=bool(reply.json()["choices"][0]["message"]["content"].strip()))
        return record

    blocks = []
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for indices in np.array_split(np.arange(requests), max(1, min(rounds, requests))):
            started = time.perf_counter()
            records = list(pool.map(one, indices.tolist()))
            blocks.append({"records": records, "wall": time.perf_counter() - started,
                           "answered": [r for r in records if r.get("status") == 200]})
    records = [r for block in blocks for r in block["records"]]
    wall = sum(block["wall"] for block in blocks)
    sent = [r for r in records if r["sent"]]
    answered = [r for r in sent if r["status"] == 200]
    latencies = np.array([r["seconds"] for r in answered]) if answered else np.array([0.0])
    measured_blocks = [block for block in blocks if block["answered"]]  # a block with no answer (past the deadline) has no figure
    return {
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "sent": len(sent),
        "not_sent": requests - len(sent),
        "answered": len(answered),
        "success_rate": round(len(answered) / max(len(sent), 1), 4),
        "lost": sum(1 for r in sent if r["status"] is None),
        "server_errors_other_than_503": sum(1 for r in sent if r["status"] and r["status"] >= 500 and r["status"] != 503),
        "statuses": {str(k): v for k, v in sorted(Counter(r["status"] for r in sent).items(), key=lambda kv: str(kv[0]))},
        "fallback_answers": sum(1 for r in answered if r["fallback"]),
        "retried": sum(1 for r in answered if r["retried"]),
        "empty_answers": sum(1 for r in answered if not r["nonempty"]),
        "answered_by": dict(Counter(e for r in answered for e in r["answered_by"]).most_common()),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
        "latency_p99_s": round(float(np.percentile(latencies, 99)), 4),
        "latency_max_s": round(float(latencies.max()), 4),
        "throughput_rps": round(len(answered) / wall, 2),
        "wall_seconds": round(wall, 2),
        "rounds": {"blocks": len(blocks),
                   "throughput_rps": spread([len(b["answered"]) / b["wall"] for b in measured_blocks] or [0.0], digits=2),
                   "latency_p50_s": spread([float(np.percentile([r["seconds"] for r in b["answered"]], 50))
                                            for b in measured_blocks] or [0.0])},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="blocks the requests are sent in, one after another (the spread)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--fault-expert", default="smollm2-math")
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--max-seconds", type=float, default=360.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--warmup", type=int, default=32, help="requests sent first (every expert loaded), not counted")
    parser.add_argument("--out", type=Path, default=Path("evals/results/load_report.json"))
    add_note_argument(parser)
    args = parser.parse_args(argv)

    from core.config import CoeConfig
    from deploy.app import start, stop

    config = CoeConfig.model_validate({
        "faults": {"experts": [args.fault_expert], "rate": args.fault_rate, "seed": 0},
        "serve": {"num_cpus": 2},
    })
    url = start(config, host="127.0.0.1", port=args.port)
    try:
        run_load(url, requests=args.warmup, concurrency=min(8, args.concurrency), max_tokens=args.max_tokens, seed=99)  # warm-up
        before = pools.pool_reports(url)
        summary = run_load(url, args.requests, args.concurrency, args.max_tokens, max_seconds=args.max_seconds, rounds=args.rounds)
        summary |= pools.while_measured(before, pools.pool_reports(url))
        summary["steady"] = pools.steady(summary)
        metrics = httpx.get(f"{url}/metrics").text
        backend = httpx.get(f"{url}/v1/models").json()["coe"]["backend"]
    finally:
        stop()
    summary["backend"] = backend  # what ran the experts in the pools (auto: vLLM where installed)
    summary["fault"] = {"expert": args.fault_expert, "rate": args.fault_rate, "mode": "error"}
    summary["resilience"] = config.resilience.model_dump()
    summary["incidents_counted"] = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                                    for line in metrics.splitlines() if line.startswith("coe_incidents_total{")}
    return write_summary(summary, args.out, args=args, argv=argv, program=module_program(__spec__), backend=backend)


if __name__ == "__main__":
    main()
