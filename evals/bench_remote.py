"""coe in front of a remote vLLM server vs the client calling that server directly, in one run:
coe's added latency and its throughput as a ratio of the direct calls, per number of clients.

    python -m evals.bench_remote [--clients 1 8] [--max-tokens 8] [--rounds 5] [--out evals/results/bench_remote.json]

The upstream is vLLM's own OpenAI server over SmolLM2 with an API key, started as the remote
expert's tests start it (evals/servers.py). coe runs with a catalog whose only (and default)
expert is `remote` (`weights.source: remote` pointing at that server, the key in an environment
variable), as coe's HTTP app (deploy.server build_api over an in-process pipeline) served by
uvicorn in a process of its own: no Ray Serve, no response cache. Both sides get the same
closed-loop load: N client threads, each with its own keep-alive HTTP connection, posting chat
completions of short held-out benchmark questions one after another (temperature 0,
`--max-tokens`, not streamed); coe is asked for the expert by name (`model: remote`), the direct
side for the served model. The baseline is the direct side. The two sides take turns in blocks
(per round and client count: direct then coe, the other way round on odd rounds), so drift in
the load of this shared machine hits both alike; latencies and throughput pool every round's
blocks. The result has p50/p90 latency and requests/s of each side, coe's added p50/p90 (ms) and
its throughput as a ratio of the direct side's, the same per round (`rounds`: the spread), the p50 of
coe's own timings (`coe.timings`: `total` is the pipeline, `generate` the upstream call within
it), whether coe's answers at 1 client equal the direct ones, and the targets (added p50 at 1
client <= 50 ms; throughput at 8 clients >= 0.8x direct).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from evals.bench_load import questions
from evals.provenance import add_note_argument, module_program, write_summary
from evals.rounds import spread, turns
from evals.servers import free_port, start_server, stop_server, vllm_openai_server

EXPERT = "remote"  # the catalog's only expert, what coe is asked for
SERVED_MODEL = "smollm2"  # the name vLLM's server serves SmolLM2 under
KEY_ENV = "COE_BENCH_REMOTE_KEY"  # where coe's catalog finds the upstream's key
SIDES = ("direct", "coe")
TARGETS = {"added_p50_ms_at_1_client_at_most": 50.0, "throughput_ratio_at_8_clients_at_least": 0.8}


def write_catalog(folder: Path, upstream: str) -> Path:
    """The catalog a user would write for the upstream: one remote expert, the default."""
    import yaml

    catalog = {"default_expert": EXPERT, "experts": [{
        "name": EXPERT, "kind": "base", "description": "SmolLM2 on vLLM's OpenAI server", "context_length": 1024,
        "params": 134515008,  # SmolLM2-135M: prices derived from it
        "weights": {"source": "remote", "base_url": upstream, "model": SERVED_MODEL, "api_key_env": KEY_ENV}}]}
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def serve_app(port: int, catalog_path: str) -> None:
    """`--serve-app PORT CATALOG`: coe's HTTP app over a pipeline on that catalog, served by
    uvicorn in this process until it is terminated. Requests name the expert: no router."""
    import uvicorn

    from core.catalog import load_catalog
    from deploy.server import LocalPipelineClient, build_api
    from experts.backends import build_backend
    from orchestrator.pipeline import Pipeline

    catalog = load_catalog(catalog_path)
    with Pipeline(catalog, build_backend("hf", catalog), {}, default_policy=EXPERT) as pipeline:
        uvicorn.run(build_api(LocalPipelineClient(pipeline)), host="127.0.0.1", port=port, log_level="warning")


class Side:
    """One way of asking: its chat completions URL, the model it is asked for, its headers."""

    def __init__(self, name: str, url: str, model: str, headers: dict, max_tokens: int):
        self.name, self.url, self.model, self.headers, self.max_tokens = name, url, model, headers, max_tokens

    def ask(self, client: httpx.Client, prompt: str) -> dict:
        reply = client.post(f"{self.url}/chat/completions", headers=self.headers, json={
            "model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens,
            "temperature": 0})
        reply.raise_for_status()
        return reply.json()


def run_block(side: Side, prompts: list[str], clients: int) -> dict:
    """`clients` threads, each with its own keep-alive connection (opened before the clock starts),
    answer the prompts between them one request at a time; per request the latency and the reply."""
    connections = [httpx.Client(timeout=300) for _ in range(clients)]
    for connection in connections:  # connected, so neither side pays a TCP handshake in the block
        connection.get(side.url.removesuffix("/v1") + "/v1/models", headers=side.headers).raise_for_status()
    pending = list(enumerate(prompts))
    lock = threading.Lock()
    latencies: list[float] = [0.0] * len(prompts)
    replies: list[dict] = [{}] * len(prompts)
    errors: list[BaseException] = []

    def worker(connection: httpx.Client) -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                index, prompt = pending.pop(0)
            started = time.perf_counter()
            try:
                replies[index] = side.ask(connection, prompt)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                errors.append(exc)
                return
            latencies[index] = time.perf_counter() - started

    threads = [threading.Thread(target=worker, args=(c,)) for c in connections]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for connection in connections:
        connection.close()
    if errors:
        raise RuntimeError(f"{side.name}: a request failed: {errors[0]}")
    return {"latencies": latencies, "wall": wall, "replies": replies}


def stats(latencies: list[float], wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "throughput_rps": round(len(ms) / wall, 2)}


def compare(direct: dict, coe: dict) -> dict:
    return {"added_p50_ms": round(coe["p50_ms"] - direct["p50_ms"], 1), "added_p90_ms": round(coe["p90_ms"] - direct["p90_ms"], 1),
            "throughput_ratio": round(coe["throughput_rps"] / direct["throughput_rps"], 3)}


def answer(reply: dict) -> str:
    return (reply["choices"][0]["message"]["content"] or "").strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=8, help="requests per client in each block")
    parser.add_argument("--min-requests", type=int, default=24, help="requests per block at least")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per side and client count, the sides taking turns")
    parser.add_argument("--warmup", type=int, default=8, help="requests per side before the first block")
    parser.add_argument("--out", type=Path, default=None)
    add_note_argument(parser)
    args = parser.parse_args(argv)

    from core.catalog import load_catalog
    from experts.weights import base_model_dir

    sizes = {c: max(args.min_requests, c * args.per_client) for c in args.clients}
    texts = questions()
    if len(texts) < max(sizes.values()):
        raise SystemExit(f"only {len(texts)} short questions for blocks of {max(sizes.values())} requests: lower --per-client")
    model_dir = base_model_dir(load_catalog().get("smollm2-135m"))
    work = Path(tempfile.mkdtemp(prefix="coe-bench-remote-"))
    key = "sk-bench-" + os.urandom(8).hex()
    with vllm_openai_server(model_dir, SERVED_MODEL, key, work / "vllm.log") as upstream:
        port = free_port()
        coe_url = f"http://127.0.0.1:{port}/v1"
        coe_server = start_server([sys.executable, "-m", "evals.bench_remote", "--serve-app", str(port),
                                   str(write_catalog(work, upstream))], f"{coe_url}/models", work / "coe.log",
                                  {**os.environ, KEY_ENV: key}, timeout=300)
        try:
            sides = {"direct": Side("direct", upstream, SERVED_MODEL, {"authorization": f"Bearer {key}"}, args.max_tokens),
                     "coe": Side("coe", coe_url, EXPERT, {}, args.max_tokens)}
            for side in sides.values():
                run_block(side, texts[: args.warmup], min(8, max(args.clients)))
            blocks: dict[tuple[str, int], list[dict]] = {(s, c): [] for s in SIDES for c in args.clients}
            for round_ in range(args.rounds):
                for clients in args.clients:
                    for name in turns(SIDES, round_):
                        blocks[name, clients].append(run_block(sides[name], texts[: sizes[clients]], clients))
        finally:
            stop_server(coe_server)

    levels = {}
    for clients in args.clients:
        pooled = {name: stats([x for b in blocks[name, clients] for x in b["latencies"]],
                              sum(b["wall"] for b in blocks[name, clients])) for name in SIDES}
        per_round = [compare(stats(d["latencies"], d["wall"]), stats(o["latencies"], o["wall"]))
                     for d, o in zip(blocks["direct", clients], blocks["coe", clients])]
        timings = [r["coe"]["timings"] for b in blocks["coe", clients] for r in b["replies"]]
        levels[str(clients)] = {
            **pooled, **compare(pooled["direct"], pooled["coe"]),
            "rounds": {"added_p50_ms": spread([r["added_p50_ms"] for r in per_round], digits=1),
                       "throughput_ratio": spread([r["throughput_ratio"] for r in per_round])},
            "coe_timings_p50_ms": {key: round(float(np.percentile([t[key] for t in timings], 50)) * 1000, 1)
                                   for key in ("total", "generate")},
        }
    first = [(answer(d), answer(o)) for d, o in zip(blocks["direct", min(args.clients)][0]["replies"],
                                                    blocks["coe", min(args.clients)][0]["replies"])]
    one, eight = levels.get("1"), levels.get("8")
    summary = {
        "what": "coe (its HTTP app in-process under uvicorn, no Ray Serve) in front of vLLM's OpenAI server vs the "
                "client calling that server directly",
        "baseline": "direct", "coe_server": "app", "coe_model": EXPERT, "upstream": "vllm.entrypoints.openai.api_server",
        "model": "smollm2-135m", "max_tokens": args.max_tokens, "temperature": 0, "stream": False, "rounds": args.rounds,
        "requests_per_block": {str(c): n for c, n in sizes.items()},
        "same_answers_at_fewest_clients": round(float(np.mean([d == o for d, o in first])), 3),
        "levels": levels,
        "targets": {
            **TARGETS,
            "met_added_p50_at_1_client": one["added_p50_ms"] <= TARGETS["added_p50_ms_at_1_client_at_most"] if one else None,
            "met_throughput_at_8_clients": (eight["throughput_ratio"] >= TARGETS["throughput_ratio_at_8_clients_at_least"]
                                            if eight else None),
        },
    }
    return write_summary(summary, args.out, args=args, argv=argv, program=module_program(__spec__), backend="remote")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-app":
        serve_app(int(sys.argv[2]), sys.argv[3])
    else:
        main()
