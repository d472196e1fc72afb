"""Benchmark of the tiered memory pool and batched expert loading; prints one JSON object.

    python -m evals.bench_pool [--queries 64] [--max-tokens 8] [--rounds 3] [--out evals/results/bench_pool.json]

Every comparison is measured in the same run, on the same workload. The compared ways of the first
two run `--rounds` times each, taking turns (evals/rounds.py); the run with the median wall time
stands for each way, and `wall_s_rounds` and `wall_speedup_rounds` (per round, against the same
round of the baseline) give the spread:

- `planned_vs_naive`: a mixed batch over eight experts (two full SmolLM2 models, six LoRA experts
  on them) with a device budget that holds one base and four adapters, against two baselines.
  Naive: each request in arrival order, loading its expert on demand (LRU, no plan), one request
  per forward pass. Grouped: the same requests batched per expert, the groups in the order their
  first request arrived, each group loading its expert on demand (LRU, nothing announced), so it
  batches like the plan but does not order bases or evict by the plan. Planned: the pipeline's
  plan (one group per expert, experts of a base back to back, each loaded once; Belady eviction
  on the announced order; the next stage prefetched), through the real Pipeline and HF backend.
  `best_baseline` names the faster baseline, which the planned run's ratios are taken against.
- `prefetch`: the planned batch with prefetch on vs off, with a device budget that holds the
  current stage and the next; `prefetch_overlap` (load_hidden / load_transfer) is the share of
  the transfer time overlapped with computation.
- `tiers_vs_raw`: the HF mover's disk -> host and host -> device moves of the base model vs a raw
  read of its safetensors file and a raw copy of the same bytes in memory.
- `mixed_lora`: 24 prompts over four LoRA experts of one base in one forward pass (peft
  `adapter_names`) vs one adapter at a time (four passes), tokens/s.
- `simulated_h100`: the same request mix on H100-sized experts (SimulatedMover: 50 GB/s host ->
  device, 7 GB/s NVMe) with no compute: loads, bytes and seconds of loading, planned vs naive.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from core.catalog import Catalog, load_catalog
from core.config import ResilienceConfig
from core.prompts import user_prompt
from core.types import Decision, ExpertScore, GenerationParams, GenerationRequest, Message, Query
from evals.provenance import add_note_argument, module_program, write_summary
from evals.rounds import in_rounds, spread
from experts.backends.dtype import resolve_dtype
from experts.pool import GB, SimulatedMover, TierBudgets, TieredPool
from experts.tasks import TASKS
from experts.weights import base_model_dir
from orchestrator import planner

SECOND_BASE = "smollm2-135m-b"  # a second full model: its own instantiated copy of SmolLM2
TASK_OF = {"smollm2-135m": "science", "smollm2-math": "math", "smollm2-science": "science",
           "smollm2-medicine": "medicine", "smollm2-logic": "logic", SECOND_BASE: "medicine",
           "smollm2-b-science": "science", "smollm2-b-logic": "logic"}


def bench_catalog() -> Catalog:
    """The default pool plus a second base (the same weights, separately instantiated) with two
    LoRA experts of its own (the trained adapters, reused): 2 full models, 6 LoRA experts."""
    catalog = load_catalog()
    base = catalog.get("smollm2-135m")
    extra = [base.model_copy(update={"name": SECOND_BASE, "base": SECOND_BASE})]
    for name, adapter in (("smollm2-b-science", "smollm2-science"), ("smollm2-b-logic", "smollm2-logic")):
        extra.append(catalog.get(adapter).model_copy(update={"name": name, "base": SECOND_BASE}))
    experts = [e for e in catalog.experts if not e.optional] + extra
    return Catalog(experts=experts, default_expert=catalog.default_expert, adapters_root=catalog.adapters_root)


def workload(n: int, seed: int = 0, words: int | None = None) -> list[tuple[str, str]]:
    """(expert, prompt) pairs in arrival order: experts drawn at random, prompts from their task
    (cut to their first `words` words for a chat-length, decode-bound workload)."""
    rng = random.Random(seed)
    items = {task: TASKS[task].heldout() for task in set(TASK_OF.values())}
    experts = list(TASK_OF)
    pairs = [(e, user_prompt(rng.choice(items[TASK_OF[e]]))) for e in (rng.choice(experts) for _ in range(n))]
    return [(e, " ".join(p.split()[:words])) for e, p in pairs] if words else pairs


def cold(backend) -> None:
    """Everything back to disk, counters reset: each run starts from the same state."""
    pool = backend.pool
    for name, tier in pool.residence().items():
        if tier != "disk" and pool.state().parents.get(name) is None:
            pool.evict(name, to="disk")
    for name, tier in pool.residence().items():
        if tier != "disk":
            pool.evict(name, to="disk")
    pool.reset_stats()


def summary(backend, wall: float, results=None) -> dict:
    stats = backend.pool.stats()
    out = {"wall_s": round(wall, 3), "loads": stats.loads, "evictions": stats.evictions,
           "bytes_moved": sum(stats.bytes_moved.values()), "bytes_loaded": stats.bytes_loaded,
           "load_s": round(stats.load_seconds, 3), "stall_s": round(stats.stall_seconds, 3),
           "moves": stats.moves}
    if results:
        t = results[0].timings
        out.update(load_transfer_s=round(t["load_transfer"], 3), load_hidden_s=round(t["load_hidden"], 3),
                   prefetch_overlap=round(t["load_hidden"] / t["load_transfer"], 3) if t["load_transfer"] else 0.0,
                   generate_s=round(t["generate"], 3))
    return out


def run_naive(pipeline, queries: list[Query]) -> dict:
    cold(pipeline.backend)
    started = time.perf_counter()
    for q in queries:
        pipeline.run([q])
    return summary(pipeline.backend, time.perf_counter() - started)


def run_grouped(pipeline, queries: list[Query]) -> dict:
    """One batch per expert, in the order each expert's first request arrived."""
    cold(pipeline.backend)
    groups: dict[str, list[Query]] = {}
    for q in queries:
        groups.setdefault(q.policy, []).append(q)
    started = time.perf_counter()
    for group in groups.values():
        pipeline.run(group)
    return summary(pipeline.backend, time.perf_counter() - started)


def run_planned(pipeline, queries: list[Query], prefetch: bool) -> dict:
    cold(pipeline.backend)
    pipeline.prefetch = prefetch
    started = time.perf_counter()
    results = pipeline.run(queries)
    return summary(pipeline.backend, time.perf_counter() - started, results)


def median_round(runs: list[dict]) -> dict:
    """The run with the median wall time stands for the way (every figure from one real run), with
    each run's wall time beside it (`wall_s_rounds`: the spread)."""
    ordered = sorted(runs, key=lambda run: run["wall_s"])
    return ordered[(len(ordered) - 1) // 2] | {"wall_s_rounds": spread([run["wall_s"] for run in runs])}


def speedups(baseline: list[dict], runs: list[dict]) -> dict:
    """Per round, the baseline's wall time over the run's in the same round."""
    return spread([b["wall_s"] / r["wall_s"] for b, r in zip(baseline, runs)], digits=2)


def tiers_vs_raw(backend, repeats: int = 3) -> dict:
    import torch

    pool, name = backend.pool, "smollm2-135m"
    path = base_model_dir(backend.catalog.get(name)) / "model.safetensors"
    size = pool.state().sizes[name]
    disk_host, host_device, raw_read, raw_copy = [], [], [], []
    for _ in range(repeats):
        cold(backend)
        pool.ensure(name)
        stats = pool.stats()
        disk_host.append(stats.seconds["disk->host"])
        host_device.append(stats.seconds["host->device"])
        started = time.perf_counter()
        data = path.read_bytes()
        raw_read.append(time.perf_counter() - started)
        del data
        source = torch.ones(size, dtype=torch.uint8)
        target = torch.empty_like(source)
        started = time.perf_counter()
        target.copy_(source)
        raw_copy.append(time.perf_counter() - started)
        del source, target
    med = statistics.median
    return {"bytes_in_memory": size, "file_bytes": path.stat().st_size, "dtype": str(backend.dtype),
            "disk_to_host_s": round(med(disk_host), 4), "raw_read_s": round(med(raw_read), 4),
            "disk_to_host_vs_raw_read": round(med(disk_host) / med(raw_read), 2),
            "host_to_device_s": round(med(host_device), 4), "raw_copy_s": round(med(raw_copy), 4),
            "host_to_device_vs_raw_copy": round(med(host_device) / med(raw_copy), 2),
            "method": "on a CPU the device tier is the instantiated model: host -> device builds it around the host "
                    "tensors without copying them; disk -> host reads the file and converts it to the serving dtype"}


def mixed_lora(backend, prompts: int = 24, max_tokens: int = 32) -> dict:
    """Four LoRA experts of one base in one forward pass vs one adapter at a time (the baseline)."""
    adapters = ["smollm2-math", "smollm2-science", "smollm2-medicine", "smollm2-logic"]
    items = TASKS["science"].heldout()
    requests = [GenerationRequest(expert=adapters[i % len(adapters)], messages=[Message(role="user", content=user_prompt(items[i]))],
                                  params=GenerationParams(max_tokens=max_tokens)) for i in range(prompts)]
    with backend.pool.pinned(adapters):  # loading is not what this measures
        backend.generate(requests[:4])  # warm-up
        started = time.perf_counter()
        mixed = backend.generate(requests)
        mixed_s = time.perf_counter() - started
        started = time.perf_counter()
        alone = [a for adapter in adapters for a in backend.generate([r for r in requests if r.expert == adapter])]
        alone_s = time.perf_counter() - started
    # The ratio is of the rates as recorded, so the file's figures agree with each other.
    mixed_tps = round(sum(a.completion_tokens for a in mixed) / mixed_s, 1)
    alone_tps = round(sum(a.completion_tokens for a in alone) / alone_s, 1)
    return {"prompts": prompts, "adapters": len(adapters), "max_tokens": max_tokens,
            "mixed_tokens_per_s": mixed_tps, "one_at_a_time_tokens_per_s": alone_tps,
            "mixed_vs_one_at_a_time": round(mixed_tps / alone_tps, 2)}


def simulated_h100(experts_in_order: list[str]) -> dict:
    """The same request mix on H100-sized experts: 8B-class bases (16 GB in bf16), LoRA adapters of
    160 MB, and a device budget for weights of one base and three adapters (the rest of the GPU
    being KV cache)."""
    sizes = {"smollm2-135m": 16 * GB, SECOND_BASE: 16 * GB}
    parents = {"smollm2-math": "smollm2-135m", "smollm2-science": "smollm2-135m", "smollm2-medicine": "smollm2-135m",
               "smollm2-logic": "smollm2-135m", "smollm2-b-science": SECOND_BASE, "smollm2-b-logic": SECOND_BASE}
    sizes |= {name: 160 * 10**6 for name in parents}

    def pool() -> TieredPool:
        p = TieredPool(TierBudgets(device=16 * GB + 3 * 160 * 10**6, host=512 * GB), SimulatedMover())
        for name in sorted(sizes, key=lambda n: n in parents):
            p.add(name, sizes[name], parent=parents.get(name))
        return p

    naive = pool()
    for expert in experts_in_order:
        with naive.pinned([expert]):
            pass
    grouped = pool()
    for expert in dict.fromkeys(experts_in_order):  # one batch per expert, in first-arrival order
        with grouped.pinned([expert]):
            pass
    planned = pool()
    decisions = [Decision(query_id=f"q{i}", policy="bench", ranked=[ExpertScore(expert=e, score=1.0)])
                 for i, e in enumerate(experts_in_order)]
    batch_plan = planner.plan(decisions, planned.state())
    with planned.announce(batch_plan.order):
        for stage in batch_plan.stages():
            for group in stage:  # one adapter at a time: this device budget holds the base and three adapters
                with planned.pinned([group.expert]):
                    pass

    def figures(p: TieredPool) -> dict:
        s = p.stats()
        return {"loads": s.loads, "bytes_loaded_gb": round(s.bytes_loaded / GB, 2), "load_s": round(s.load_seconds, 2)}

    result = {"naive": figures(naive), "grouped": figures(grouped), "planned": figures(planned),
              "planned_loads_predicted": batch_plan.loads}
    result["best_baseline"] = min(("naive", "grouped"), key=lambda name: result[name]["load_s"])
    result["load_s_ratio"] = round(result[result["best_baseline"]]["load_s"] / max(result["planned"]["load_s"], 1e-9), 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU runs it natively, else float32")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each way (planned, naive, grouped; prefetch on, off), taking turns (the spread)")
    parser.add_argument("--prompt-words", type=int, default=None,
                        help="cut prompts to this many words (default: whole task prompts, prefill-bound on a CPU)")
    parser.add_argument("--skip-micro", action="store_true", help="only planned vs naive and prefetch")
    parser.add_argument("--mixed-prompts", type=int, default=24, help="mixed_lora: prompts over the four adapters")
    parser.add_argument("--mixed-tokens", type=int, default=32, help="mixed_lora: new tokens per prompt")
    parser.add_argument("--raw-repeats", type=int, default=3, help="tiers_vs_raw: repeats (the median is reported)")
    parser.add_argument("--out", type=Path, default=None)
    add_note_argument(parser)
    args = parser.parse_args(argv)
    args.dtype = resolve_dtype(args.dtype)

    from experts.backends.hf import HFBackend
    from orchestrator.pipeline import Pipeline

    catalog = bench_catalog()
    backend = HFBackend(catalog, dtype=args.dtype, max_batch_size=64)
    sizes = backend.pool.state().sizes
    base, adapter = sizes["smollm2-135m"], sizes["smollm2-math"]
    # Tight: the device holds one base and four adapters; host holds both bases and every adapter
    # (an SN40L-style DDR tier). Roomy: the device holds the current stage and the next one too,
    # which prefetching needs.
    tight = TierBudgets(device=base + 4 * adapter, host=2 * base + 8 * adapter)
    roomy = TierBudgets(device=2 * base + 8 * adapter, host=2 * base + 8 * adapter)
    backend.pool.budgets = tight
    backend.pool.host_adapters = 8
    # No timeout or retry: a stage of many queries may take minutes on a busy CPU, and this measures loading, not resilience.
    pipeline = Pipeline(catalog, backend, routers={}, default_policy="none",
                        resilience=ResilienceConfig(retries=0, timeout_seconds=None, fallback=False))
    pairs = workload(args.queries, words=args.prompt_words)
    queries = [Query.from_text(text, policy=expert, params=GenerationParams(max_tokens=args.max_tokens)) for expert, text in pairs]

    parents = backend.pool.state().parents
    needed = {e for e, _ in pairs} | {parents[e] for e, _ in pairs if e in parents}
    run_planned(pipeline, queries[:8], prefetch=True)  # warm-up: converts the second base once, fills caches
    ways = {"naive": lambda: run_naive(pipeline, queries), "grouped": lambda: run_grouped(pipeline, queries),
            "planned": lambda: run_planned(pipeline, queries, prefetch=True)}
    compared = in_rounds(ways, args.rounds)
    naive, grouped, planned = (median_round(compared[name]) for name in ways)
    best = min((("naive", naive), ("grouped", grouped)), key=lambda kv: kv[1]["wall_s"])
    backend.pool.budgets = roomy
    prefetching = in_rounds({"on": lambda: run_planned(pipeline, queries, prefetch=True),
                             "off": lambda: run_planned(pipeline, queries, prefetch=False)}, args.rounds)
    with_prefetch, no_prefetch = median_round(prefetching["on"]), median_round(prefetching["off"])
    result = {
        "dtype": args.dtype, "rounds": args.rounds,
        "workload": {"queries": len(queries), "prompt_words": args.prompt_words, "experts": len({e for e, _ in pairs}), "max_tokens": args.max_tokens,
                     "device_budget_bytes": tight.device, "host_budget_bytes": tight.host,
                     "prefetch_device_budget_bytes": roomy.device,
                     "base_bytes": base, "adapter_bytes": adapter},
        "planned_vs_naive": {"naive": naive, "grouped": grouped, "planned": planned,
                             "best_baseline": best[0],
                             "wall_speedup": round(best[1]["wall_s"] / planned["wall_s"], 2),
                             "load_s_ratio": round(best[1]["load_s"] / max(planned["load_s"], 1e-9), 2),
                             "wall_speedup_vs_naive": round(naive["wall_s"] / planned["wall_s"], 2),
                             "wall_speedup_vs_grouped": round(grouped["wall_s"] / planned["wall_s"], 2),
                             "load_s_ratio_vs_naive": round(naive["load_s"] / max(planned["load_s"], 1e-9), 2),
                             "load_s_ratio_vs_grouped": round(grouped["load_s"] / max(planned["load_s"], 1e-9), 2),
                             "wall_speedup_rounds": speedups(compared[best[0]], compared["planned"]),
                             "distinct_experts_with_bases": len(needed),
                             "planned_loads_equal_distinct_experts": planned["loads"] == len(needed)},
        "prefetch": {"on": with_prefetch, "off": no_prefetch,
                     "wall_speedup": round(no_prefetch["wall_s"] / with_prefetch["wall_s"], 2),
                     "wall_speedup_rounds": speedups(prefetching["off"], prefetching["on"])},
    }
    if not args.skip_micro:
        result |= {"tiers_vs_raw": tiers_vs_raw(backend, args.raw_repeats),
                   "mixed_lora": mixed_lora(backend, args.mixed_prompts, args.mixed_tokens),
                   "simulated_h100": simulated_h100([e for e, _ in pairs])}
    return write_summary(result, args.out, args=args, argv=argv, program=module_program(__spec__), backend=f"hf {args.dtype}")


if __name__ == "__main__":
    main()
