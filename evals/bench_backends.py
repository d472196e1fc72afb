"""vLLM backend vs transformers backend on this machine, ratios measured in one run (one dtype for both).

    python -m evals.bench_backends [--rounds 3] --json evals/results/bench_backends.json

- online: requests for 4 LoRA experts and the base arriving 50 ms apart, 64 new tokens each, sent
  the way a server sends them (`agenerate`: vLLM batches them continuously in its engine, the
  transformers backend micro-batches: what arrives while a batch runs forms the next batch);
  tokens/s and p50/p90/p99 latency.
- static: 64 prompts x 32 tokens in one `generate` call vs each raw engine called directly
  (transformers `model.generate`, vLLM `AsyncLLM.generate` without our wrapper): what the backend adds.
- mixed LoRA: the same prompts spread over 4 LoRA experts in one batch vs all on one adapter.
- engine start seconds and first use of an adapter.

Both backends are up at once and every workload runs `--rounds` times on each, the backends
taking turns (evals/rounds.py), so drift in this shared machine's load hits both alike: figures
pool the rounds (tokens over summed seconds, latency percentiles over every request),
`tokens_per_s_rounds` keeps each round's rate and `ratios_vllm_over_hf_rounds` each round's ratio
(round r of one backend against round r of the other): the spread.

Per workload, `fastest` names the faster backend (tokens/s; lower p90 for the online one) and
gives the other's ratio to it; `ratios_vllm_over_hf` keeps vLLM over transformers throughout.

Prompts ask for stories so that nearly every request runs to its token limit; throughput counts
the tokens really generated. Needs the vLLM engine (scripts/install.sh installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import time
from pathlib import Path

from core.catalog import load_catalog
from core.types import ExpertAnswer, GenerationParams, GenerationRequest, Message
from evals.provenance import add_note_argument, module_program, write_summary
from evals.rounds import in_rounds, spread
from experts.backends.dtype import resolve_dtype

LORAS = ["smollm2-math", "smollm2-science", "smollm2-medicine", "smollm2-logic"]
BASE = "smollm2-135m"
TOPICS = ["a dragon", "the sea", "a lost key", "a robot", "winter", "a city at night", "a small boat", "an old map",
          "a garden", "the moon", "a violin", "a train journey", "a lighthouse", "a fox", "rain", "a market"]


def request(expert: str, i: int, max_tokens: int) -> GenerationRequest:
    text = f"Write a long story about {TOPICS[i % len(TOPICS)]}, part {i}."
    return GenerationRequest(expert=expert, messages=[Message(role="user", content=text)],
                             params=GenerationParams(max_tokens=max_tokens))


def tokens(answers: list[ExpertAnswer]) -> int:
    return sum(a.completion_tokens for a in answers)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def static(backend, experts: list[str], prompts: int, max_tokens: int) -> dict:
    batch = [request(experts[i % len(experts)], i, max_tokens) for i in range(prompts)]
    seconds, answers = timed(backend.generate, batch)
    return {"seconds": seconds, "tokens": tokens(answers)}


def online(backend, requests: int, gap_s: float, max_tokens: int) -> dict:
    experts = [BASE, *LORAS]
    batch = [request(experts[i % len(experts)], i, max_tokens) for i in range(requests)]

    async def arrive(i: int, req: GenerationRequest):
        await asyncio.sleep(i * gap_s)
        sent = time.perf_counter()
        answer = await backend.agenerate(req)
        return time.perf_counter() - sent, answer

    async def run_all():
        started = time.perf_counter()
        done = await asyncio.gather(*(arrive(i, r) for i, r in enumerate(batch)))
        return time.perf_counter() - started, done

    seconds, done = asyncio.run(run_all())
    return {"seconds": seconds, "tokens": tokens([a for _, a in done]), "latencies": [d for d, _ in done]}


def pooled(runs: list[dict]) -> dict:
    """One workload over every round: tokens over summed seconds, latency percentiles (online) over
    every request, and each round's tokens/s (`tokens_per_s_rounds`: the spread)."""
    seconds, total = sum(run["seconds"] for run in runs), sum(run["tokens"] for run in runs)
    out = {"seconds": round(seconds, 3), "tokens": total, "tokens_per_s": round(total / seconds, 1),
           "tokens_per_s_rounds": spread([run["tokens"] / run["seconds"] for run in runs], digits=1)}
    latencies = [x for run in runs for x in run.get("latencies", [])]
    if latencies:
        out |= {"p50_s": round(statistics.median(latencies), 3), "p90_s": round(percentile(latencies, 0.9), 3),
                "p99_s": round(percentile(latencies, 0.99), 3)}
    return out


def raw_hf(backend, prompts: int, max_tokens: int) -> dict:
    """transformers' own batched generate on the base, no backend code around it."""
    import torch

    backend.load(BASE)
    loaded = backend._bases[BASE]
    texts = [backend._prompt(loaded, request(BASE, i, max_tokens)) for i in range(prompts)]
    with torch.inference_mode(), loaded.model.disable_adapter() if loaded.adapters else contextlib.nullcontext():
        enc = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        started = time.perf_counter()
        out = loaded.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, pad_token_id=loaded.tokenizer.pad_token_id)
        seconds = time.perf_counter() - started
    generated = out[:, enc["input_ids"].shape[1]:]
    eos = loaded.tokenizer.eos_token_id
    count = sum(next((j + 1 for j, t in enumerate(row.tolist()) if t == eos), len(row)) for row in generated)
    return {"seconds": seconds, "tokens": count}


def raw_vllm(backend, prompts: int, max_tokens: int) -> dict:
    """The engine's own generate on the base (no LoRA request), no backend code around it."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from experts.backends.base import render_prompt

    backend.load(BASE)  # through the pool: the base's engine started
    engine = backend._engines[BASE]
    spec = backend.catalog.get(BASE)
    ids = [engine.tokenizer(render_prompt(engine.tokenizer, spec.chat, request(BASE, i, max_tokens).messages),
                            add_special_tokens=False)["input_ids"] for i in range(prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)

    async def one(i):
        async for out in engine.engine.generate({"prompt_token_ids": ids[i]}, params, f"raw-{time.time()}-{i}"):
            final = out
        return len(final.outputs[0].token_ids)

    async def run_all():
        return sum(await asyncio.gather(*(one(i) for i in range(prompts))))

    seconds, count = timed(backend._on_loop, run_all())
    return {"seconds": seconds, "tokens": count}


WORKLOADS = ("static", "static_raw_engine", "one_adapter", "mixed_4_adapters", "online")


def prepare(backend) -> dict:
    """Start-up figures (the engine, the first adapter, a request for an adapter not yet loaded),
    then every expert loaded and a warm-up batch."""
    start_s = backend.load(BASE)
    first_adapter_s = backend.load(LORAS[0])
    first_request_s, _ = timed(backend.generate, [request(LORAS[1], 0, 16)])  # loads LORAS[1], then runs
    for expert in LORAS:
        backend.load(expert)
    backend.generate([request(e, i, 8) for i, e in enumerate([BASE, *LORAS] * 2)])  # warm-up
    return {"start_s": round(start_s, 2), "first_adapter_load_s": round(first_adapter_s, 3),
            "first_request_new_adapter_s": round(first_request_s, 3)}


def one_round(backend, raw, args) -> dict:
    """Every workload once on one backend."""
    return {"static": static(backend, [BASE], args.static_prompts, args.static_tokens),
            "static_raw_engine": raw(backend, args.static_prompts, args.static_tokens),
            "one_adapter": static(backend, [LORAS[1]], args.static_prompts, args.static_tokens),
            "mixed_4_adapters": static(backend, LORAS, args.static_prompts, args.static_tokens),
            "online": online(backend, args.online_requests, args.gap_ms / 1000, args.online_tokens)}


def rate(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def summarize(prepared: dict, rounds: list[dict]) -> dict:
    """One backend's figures: start-up, and each workload pooled over the rounds."""
    result = prepared | {workload: pooled([r[workload] for r in rounds]) for workload in WORKLOADS}
    result["static_vs_raw"] = round(result["static"]["tokens_per_s"] / result["static_raw_engine"]["tokens_per_s"], 3)
    result["mixed_vs_one_adapter"] = round(result["mixed_4_adapters"]["tokens_per_s"] / result["one_adapter"]["tokens_per_s"], 3)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the summary here too")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU runs it natively, else float32")
    parser.add_argument("--static-prompts", type=int, default=64)
    parser.add_argument("--static-tokens", type=int, default=32)
    parser.add_argument("--online-requests", type=int, default=48)
    parser.add_argument("--online-tokens", type=int, default=64)
    parser.add_argument("--gap-ms", type=float, default=50.0)
    parser.add_argument("--hf-batch", type=int, default=64, help="transformers backend max_batch_size")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every workload per backend, the backends taking turns")
    add_note_argument(parser)
    args = parser.parse_args(argv)
    args.dtype = resolve_dtype(args.dtype)

    from experts.backends.hf import HFBackend
    from experts.backends.vllm import VLLMBackend

    catalog = load_catalog()
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "note")}}
    backends = {"hf": HFBackend(catalog, dtype=args.dtype, max_batch_size=args.hf_batch),
                "vllm": VLLMBackend(catalog, dtype=args.dtype, max_num_seqs=max(64, args.online_requests))}
    raws = {"hf": raw_hf, "vllm": raw_vllm}
    try:
        prepared = {name: prepare(backend) for name, backend in backends.items()}
        rounds = in_rounds({name: functools.partial(one_round, backend, raws[name], args) for name, backend in backends.items()},
                           args.rounds)
    finally:
        backends["vllm"].shutdown()
    for name in backends:
        results[name] = summarize(prepared[name], rounds[name])
    v, h = results["vllm"], results["hf"]
    results["ratios_vllm_over_hf"] = {
        "online_tokens_per_s": round(v["online"]["tokens_per_s"] / h["online"]["tokens_per_s"], 3),
        "online_p50": round(v["online"]["p50_s"] / h["online"]["p50_s"], 3),
        "online_p90": round(v["online"]["p90_s"] / h["online"]["p90_s"], 3),
        "static_tokens_per_s": round(v["static"]["tokens_per_s"] / h["static"]["tokens_per_s"], 3),
        "mixed_tokens_per_s": round(v["mixed_4_adapters"]["tokens_per_s"] / h["mixed_4_adapters"]["tokens_per_s"], 3),
    }
    results["ratios_vllm_over_hf_rounds"] = {  # round r of vLLM against round r of transformers
        f"{workload}_tokens_per_s": spread([rate(x[workload]) / rate(y[workload]) for x, y in zip(rounds["vllm"], rounds["hf"])])
        for workload in ("online", "static", "mixed_4_adapters")}
    results["fastest"] = fastest_per_workload(results)
    return write_summary(results, args.json, args=args, argv=argv, program=module_program(__spec__), backend="hf, vllm")


def fastest_per_workload(results: dict) -> dict:
    """Per workload the faster backend and the other's ratio to it (tokens/s; p90 latency online)."""
    out = {}
    for workload in ("online", "static", "one_adapter", "mixed_4_adapters"):
        rate = {name: results[name][workload]["tokens_per_s"] for name in ("hf", "vllm")}
        best = max(rate, key=rate.get)
        other = next(name for name in rate if name != best)
        out[workload] = {"backend": best, "tokens_per_s": rate[best], "other": other,
                         "other_vs_fastest_tokens_per_s": round(rate[other] / rate[best], 3)}
    p90 = {name: results[name]["online"]["p90_s"] for name in ("hf", "vllm")}
    best = min(p90, key=p90.get)
    out["online_p90"] = {"backend": best, "p90_s": p90[best], "other": next(n for n in p90 if n != best),
                         "other_vs_fastest_p90": round(max(p90.values()) / p90[best], 3)}
    return out


if __name__ == "__main__":  # the guard vLLM's spawned engine process needs
    main()
