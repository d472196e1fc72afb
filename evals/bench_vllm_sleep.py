"""vLLM sleep/wake as the pool's host tier, on a GPU; prints one JSON object.

    python -m evals.bench_vllm_sleep [--prompts 32] [--max-tokens 32] [--compile] [--out evals/results/bench_vllm_sleep.json]

On a lent GPU machine without vLLM, scripts/device_vllm.sh carries and installs it first.

Needs a CUDA GPU: vLLM's sleep mode is a no-op on a CPU (there `offload` stops the engine).
Two SmolLM2 bases (the default pool's, and a second copy with two LoRA experts of its own:
evals/bench_pool.py's catalog), one vLLM engine each, driven by the real `VLLMBackend`. Measured
in one run, each figure next to its baseline:

- `engine`: cold start of the first engine from its files (process, weights, KV cache).
- `sleep_wake`: `sleep(level=1)` (weights to pinned host memory, KV cache dropped) and `wake_up()`:
  seconds, the device memory the sleep frees (device-wide, from `torch.cuda.mem_get_info`),
  wake-up vs the cold start and vs a raw pinned host -> device copy of the same weight bytes,
  and whether greedy answers of a mixed LoRA batch after the wake-up equal those before it.
- `mixed_lora`: one batch over the base and its four LoRA experts in one engine vs the same
  prompts one expert at a time: tokens/s.
- `planned_vs_naive`: requests over both bases' experts with a device budget for one base
  (the backend's TieredPool, moved by VLLMMover: the other engine sleeps). Naive: arrival order,
  one request at a time, switching on demand. Grouped: one batch per expert in first-arrival
  order, switching on demand (batched, but no plan). Planned: the planner's groups, each base
  woken once, its experts' requests in one batch. Switches (sleep/wake) and wall time;
  `wall_speedup` is against the faster baseline (`best_baseline`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from core.types import Decision, ExpertScore, GenerationParams, GenerationRequest, Message
from evals.bench_pool import SECOND_BASE, bench_catalog
from evals.provenance import add_note_argument, module_program, write_summary
from experts.pool import TieredPool
from orchestrator import planner

BASE = "smollm2-135m"
# Short chat prompts: this benchmark measures moving engines, not answer quality.
PROMPTS = [
    "What is 17 * 23?", "Name the largest planet in the solar system.", "What does the liver do?",
    "If all cats are animals and Tom is a cat, is Tom an animal?", "How many legs do three spiders have?",
    "Why is the sky blue?", "What is a common symptom of the flu?", "Which is heavier, a kilo of iron or of feathers?",
]


def requests_for(experts: list[str], n: int, max_tokens: int, seed: int = 0) -> list[GenerationRequest]:
    rng = random.Random(seed)
    params = GenerationParams(max_tokens=max_tokens)
    return [GenerationRequest(expert=rng.choice(experts), messages=[Message(role="user", content=rng.choice(PROMPTS))],
                              params=params) for _ in range(n)]


def device_bytes_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def raw_pinned_copy_seconds(size: int, repeats: int = 5) -> float:
    """A plain pinned host -> device copy of `size` bytes: the floor for waking weights up."""
    import torch

    source = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    source.fill_(1)
    target = torch.empty(size, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    del source, target
    torch.cuda.empty_cache()
    return statistics.median(times)


def tokens_per_second(answers, seconds: float) -> float:
    return round(sum(a.completion_tokens for a in answers) / seconds, 1)


def timed_generate(backend, requests):
    started = time.perf_counter()
    answers = backend.generate(requests)
    return answers, time.perf_counter() - started


def fresh_answers(backend, requests) -> list[str]:
    """Greedy answers from an empty prefix cache (a sleep empties it too), so runs compare alike."""
    backend._on_loop(backend._engines[BASE].engine.reset_prefix_cache())
    return [a.text for a in backend.generate(requests)]


def sleep_wake(backend, requests, weight_bytes: int, kv_cache_bytes: int, repeats: int) -> dict:
    before = fresh_answers(backend, requests)
    control = fresh_answers(backend, requests)  # no sleep in between: how deterministic the engine is
    one_by_one = [fresh_answers(backend, [r])[0] for r in requests[:8]]
    used_awake = device_bytes_used()
    sleeps, wakes, freed = [], [], []
    for _ in range(repeats):
        sleeps.append(backend.offload(BASE))
        freed.append(used_awake - device_bytes_used())
        wakes.append(backend.load(BASE))
    after = fresh_answers(backend, requests)
    one_by_one_after = [fresh_answers(backend, [r])[0] for r in requests[:8]]
    restored = int(statistics.median(freed)) - kv_cache_bytes  # what sleep backed up in host memory
    raw = raw_pinned_copy_seconds(restored)
    wake = statistics.median(wakes)
    start = backend.load_seconds[BASE]
    same = lambda a, b: sum(x == y for x, y in zip(a, b))
    return {
        "sleep_s": round(statistics.median(sleeps), 4), "wake_s": round(wake, 4),
        "device_bytes_freed_by_sleep": int(statistics.median(freed)), "device_bytes_used_awake": used_awake,
        "weight_bytes": weight_bytes, "kv_cache_bytes": kv_cache_bytes, "bytes_restored_by_wake": restored,
        "raw_pinned_copy_of_restored_bytes_s": round(raw, 5),
        "wake_vs_raw_copy": round(wake / raw, 2), "cold_start_vs_wake": round(start / wake, 1),
        "batch_answers": len(before),
        "batch_equal_without_sleep": same(before, control), "batch_equal_after_wake": same(before, after),
        "single_answers": len(one_by_one), "single_equal_after_wake": same(one_by_one, one_by_one_after),
        "repeats": repeats,
    }


def mixed_lora(backend, experts: list[str], n: int, max_tokens: int) -> dict:
    requests = requests_for(experts, n, max_tokens, seed=1)
    timed_generate(backend, requests)  # warm-up: every adapter in the engine
    answers, mixed = timed_generate(backend, requests)
    one_at_a_time, seconds = [], 0.0
    for expert in experts:
        part = [r for r in requests if r.expert == expert]
        if part:
            got, s = timed_generate(backend, part)
            one_at_a_time += got
            seconds += s
    return {"prompts": n, "experts": len(experts), "mixed_tokens_per_s": tokens_per_second(answers, mixed),
            "one_expert_at_a_time_tokens_per_s": tokens_per_second(one_at_a_time, seconds),
            "speedup": round((sum(a.completion_tokens for a in answers) / mixed)
                             / (sum(a.completion_tokens for a in one_at_a_time) / seconds), 2)}


def pool_budgets(catalog, backend_options: dict) -> dict:
    """Device budget: one base and its adapters; host: both bases (sleeping engines). Sizes as
    the backend accounts them (weights in bf16 plus the KV cache, per engine)."""
    element = 2
    kv_bytes = int(backend_options.get("kv_cache_gib", 1.0) * 2**30)
    base_bytes = max(e.params for e in catalog.experts if e.kind == "base") * element + kv_bytes
    adapter_bytes = sum(e.params for e in catalog.experts if e.kind == "lora") * element
    return {"device_bytes": base_bytes + adapter_bytes, "host_bytes": 2 * base_bytes + adapter_bytes,
            "host_adapters": sum(e.kind == "lora" for e in catalog.experts), "hot": {"enabled": False}}


def switching_pool(backend) -> TieredPool:
    """The backend's own pool (the only thing that moves its engines), counters reset."""
    backend.pool.reset_stats()
    return backend.pool


def settle(backend, pool: TieredPool) -> None:
    """Both engines started and asleep, adapters added, counters reset: both runs start alike."""
    for base in (BASE, SECOND_BASE):
        pool.ensure(base)
    for name, tier in pool.residence().items():
        if tier == "device" and pool.state().parents.get(name) is None:
            pool.evict(name, to="host")
    pool.reset_stats()


def planned_vs_naive(backend, experts: list[str], n: int, max_tokens: int) -> dict:
    pool = switching_pool(backend)
    requests = requests_for(experts, n, max_tokens, seed=2)

    settle(backend, pool)
    started = time.perf_counter()
    for request in requests:
        with pool.pinned([request.expert]):
            backend.generate([request])
    naive = {"wall_s": round(time.perf_counter() - started, 3), **switch_figures(pool)}

    settle(backend, pool)
    started = time.perf_counter()
    for expert in dict.fromkeys(r.expert for r in requests):  # one batch per expert, first-arrival order, nothing announced
        with pool.pinned([expert]):
            backend.generate([r for r in requests if r.expert == expert])
    grouped = {"wall_s": round(time.perf_counter() - started, 3), **switch_figures(pool)}

    settle(backend, pool)
    started = time.perf_counter()
    decisions = [Decision(query_id=str(i), policy="bench", ranked=[ExpertScore(expert=r.expert, score=1.0)])
                 for i, r in enumerate(requests)]
    batch_plan = planner.plan(decisions, pool.state())
    with pool.announce(batch_plan.order):
        for stage in batch_plan.stages():
            members = {g.expert for g in stage}
            with pool.pinned(list(members)):
                backend.generate([r for r in requests if r.expert in members])
    planned = {"wall_s": round(time.perf_counter() - started, 3), **switch_figures(pool)}
    best = min(("naive", naive), ("grouped", grouped), key=lambda kv: kv[1]["wall_s"])
    return {"requests": n, "experts": len(set(r.expert for r in requests)), "naive": naive, "grouped": grouped,
            "planned": planned, "best_baseline": best[0], "wall_speedup": round(best[1]["wall_s"] / planned["wall_s"], 2),
            "wall_speedup_vs_naive": round(naive["wall_s"] / planned["wall_s"], 2),
            "wall_speedup_vs_grouped": round(grouped["wall_s"] / planned["wall_s"], 2)}


def switch_figures(pool: TieredPool) -> dict:
    stats = pool.stats()
    bases = [stats.per_expert[b] for b in (BASE, SECOND_BASE) if b in stats.per_expert]
    return {"loads": stats.loads, "evictions": stats.evictions, "load_s": round(stats.load_seconds, 3),
            "engine_wakes": sum(b.loads for b in bases), "engine_sleeps": sum(b.evictions for b in bases),
            "seconds_per_edge": {k: round(v, 3) for k, v in stats.seconds.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="let vLLM compile and capture CUDA graphs (slower start)")
    parser.add_argument("--out", type=Path, default=None)
    add_note_argument(parser)
    args = parser.parse_args(argv)

    import importlib.util
    import os

    import torch

    if importlib.util.find_spec("flashinfer") is None:  # vLLM's GPU sampler imports it unless told not to
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if not torch.cuda.is_available():
        raise SystemExit("bench_vllm_sleep needs a CUDA GPU: vLLM's sleep mode does nothing on a CPU")
    from experts.backends.vllm import VLLMBackend

    catalog = bench_catalog()
    own_experts = [BASE] + [e.name for e in catalog.experts if e.kind == "lora" and e.base == BASE]
    all_experts = [e.name for e in catalog.experts]
    device_used_before = device_bytes_used()
    options = dict(enforce_eager=not args.compile, max_loras=len(all_experts))
    backend = VLLMBackend(catalog, pool=pool_budgets(catalog, options), **options)
    try:
        backend.load(BASE)
        weight_bytes = catalog.get(BASE).params * 2  # bf16 on the device
        result = {
            "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                        "vllm": __import__("vllm").__version__, "compiled": args.compile},
            "engine": {"cold_start_s": round(backend.load_seconds[BASE], 2),
                       "device_bytes_before_engines": device_used_before},
            "mixed_lora": mixed_lora(backend, own_experts, args.prompts, args.max_tokens),
        }
        result["sleep_wake"] = sleep_wake(backend, requests_for(own_experts, args.prompts, args.max_tokens, seed=3),
                                          weight_bytes, int(backend.kv_cache_gib * 2**30), args.repeats)
        result["planned_vs_naive"] = planned_vs_naive(backend, all_experts, args.prompts, args.max_tokens)
        result["engine"]["second_cold_start_s"] = round(backend.load_seconds[SECOND_BASE], 2)
    finally:
        backend.shutdown()
    return write_summary(result, args.out, args=args, argv=argv, program=module_program(__spec__), backend="vllm")


if __name__ == "__main__":
    main()
