"""The benchmarks `coe eval run` knows, by name: where the items come from, how answers are scored,
and how many tokens an answer may take.

Items that any embedded expert or router was fitted on (experts.tasks) are left out by default, so a
run never scores a model on its training data; `include_fitted=True` keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from core.data import Item, load_benchmark
from core.errors import unknown


@dataclass(frozen=True)
class Benchmark:
    name: str
    files: tuple[str, ...]
    kind: str  # answer kind, see evals.scoring
    max_tokens: int
    description: str


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("mmlu", ("mmlu_test",), "choice", 32, "MMLU test, 57 subjects"),
        Benchmark("mmlu_pro", ("mmlu_pro_test",), "choice", 32, "MMLU-Pro (70% public part), 14 categories, 10 options"),
        Benchmark("gsm8k", ("gsm8k_test",), "number", 256, "GSM8K test, grade-school math word problems"),
        Benchmark("arc_challenge", ("arc_challenge_test",), "choice", 32, "ARC-Challenge test, grade-school science"),
        Benchmark("medmcqa", ("medmcqa_dev",), "choice", 32, "MedMCQA dev, medical entrance exams"),
        Benchmark("math500", ("math500_test",), "math", 384, "MATH-500, competition math, boxed answers"),
        Benchmark("bbh", ("bbh",), "exact", 64, "BIG-Bench Hard, 27 tasks, exact match"),
        Benchmark("mt_bench", ("mt_bench",), "judge", 384, "MT-Bench, 80 two-turn questions, rated by a judge"),
    )
}
ALIASES = {"mmlu-pro": "mmlu_pro", "arc": "arc_challenge", "arc-challenge": "arc_challenge", "math-500": "math500",
           "mt-bench": "mt_bench"}


def get_benchmark(name: str) -> Benchmark:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise unknown("benchmark", name, BENCHMARKS)
    return BENCHMARKS[key]


@lru_cache(maxsize=1)
def fitted_ids() -> frozenset[str]:
    """Ids of every item an embedded LoRA expert was trained on or a default router was fitted on."""
    from experts.tasks import TASKS

    return frozenset(item.id for task in TASKS.values() for item in [*task.train(), *task.routing_extra()])


def benchmark_items(benchmark: Benchmark, include_fitted: bool = False) -> list[Item]:
    items = [item for f in benchmark.files for item in load_benchmark(f)]
    if include_fitted:
        return items
    fitted = fitted_ids()
    return [item for item in items if item.id not in fitted]
