"""What one more vLLM engine costs in memory on a CPU, against what the pool accounts for it.

    python -m evals.bench_engine_memory [--engines 2] [--kv-cache-gib 1.0] [--out evals/results/bench_engine_memory.json]

On a CPU the pool's device tier is this machine's RAM, and each engine is accounted its weights,
its KV cache and its processes' own memory (`engine_overhead_gib`, experts/backends/vllm.py).
This starts `--engines` engines over the embedded base, one after another (each its own
`VLLMBackend`, as hot experts' full copies are), answers one request on each, and records per
engine: the drop of the machine's available memory its start caused, and the resident (RSS),
proportional (PSS) and unique (USS) memory of the processes it started. The process overhead is
the available-memory drop less weights and KV cache, from the engines after the first (the
first also maps the libraries every later engine shares); `overhead_gib` is the largest of those,
which the default of `engine_overhead_gib` must cover (tests/test_results.py checks it does).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evals.provenance import add_note_argument, module_program, write_summary

GIB = 2**30


def _memory(processes) -> dict:
    import psutil

    totals = {"rss": 0, "pss": 0, "uss": 0}
    names = []
    for process in processes:
        try:
            info = process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        for key in totals:
            totals[key] += getattr(info, key)
        names.append(process.name())
    return {**{f"{key}_gib": round(value / GIB, 3) for key, value in totals.items()}, "processes": sorted(names)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=2, help="engines started one after another (at least 2)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    add_note_argument(parser)
    args = parser.parse_args(argv)
    if args.engines < 2:
        parser.error("--engines must be at least 2: the overhead is measured on the engines after the first")

    import psutil

    from core.catalog import load_catalog
    from core.types import GenerationParams, GenerationRequest, Message
    from experts.backends.dtype import DTYPE_BYTES
    from experts.backends.vllm import VLLMBackend

    catalog = load_catalog()
    base = catalog.get(catalog.default_expert)
    base = catalog.get(base.base) if base.kind == "lora" else base
    request = GenerationRequest(expert=base.name, messages=[Message(role="user", content="What is 2 + 2?")],
                                params=GenerationParams(max_tokens=4))
    backends, engines = [], []
    try:
        for _ in range(args.engines):
            before, available = {p.pid for p in psutil.Process().children(recursive=True)}, psutil.virtual_memory().available
            backend = VLLMBackend(catalog, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, pool={"hot": {"enabled": False}})
            backends.append(backend)
            backend.generate([request])
            started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            weights = base.params * DTYPE_BYTES[backend.dtype]
            drop = available - psutil.virtual_memory().available
            engines.append({"available_drop_gib": round(drop / GIB, 3), "weights_gib": round(weights / GIB, 3),
                            "overhead_gib": round((drop - weights) / GIB - args.kv_cache_gib, 3), **_memory(started)})
    finally:
        for backend in backends:
            backend.shutdown()
    later = engines[1:]
    summary = {
        "model": base.name, "dtype": backends[0].dtype, "kv_cache_gib": args.kv_cache_gib, "engines": engines,
        "overhead_gib": max(e["overhead_gib"] for e in later),
        "unique_per_engine_gib": max(e["uss_gib"] for e in later),
        "accounted_overhead_gib": backends[0].engine_overhead_gib,
    }
    return write_summary(summary, args.out, args=args, argv=argv, program=module_program(__spec__), backend="vllm")


if __name__ == "__main__":
    main()
