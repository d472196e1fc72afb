"""Synthesis vs vote vs the best single of the k experts, on the embedded experts' closed-form
held-out tasks, scored exactly; prints one JSON object.

    python -m evals.bench_aggregators [--limit 60] [--k 3] [--aggregator-expert smollm2-135m]
        [--backend auto] [--out evals/results/bench_aggregators.json]

Each task's questions go through the engine's one loop (orchestrator/pipeline.py) with aggregator
`synthesis`: the k recruited experts answer, then the aggregator expert reads their answers and
writes its own (one more round of the loop). The same run's k answers also give the other two
columns, so every column scores the same answers:
- `vote`: `orchestrator.aggregators.weighted_vote` over the k answers (what aggregator `vote` serves);
- `best_single`: the most accurate of the k on the task (chosen after the fact: an upper bound on
  picking one of them; `singles` lists each);
- `any_of_k`: some expert of the k was right (the ceiling no aggregator passes without knowledge of its own).

`overall` gives each aggregator's difference from the best single over all items with its 95%
paired bootstrap interval over the items (evals.metrics.paired_interval): the noise of a run this
size, within which two runs of the command can differ (vLLM on CPU batches requests as they arrive).
Recruitment is fixed per task, as a router that knows the task would rank them: the task's own
expert first, then the base model, then the other experts in catalog order; the first k answer
(scores 1.0, 0.9, 0.8, ... weight the vote). The aggregator expert is the base model by default:
it is the general chat model, and there are no synthesis outcomes to choose it by (Symbolic-MoE
picks the aggregator by such a score where it exists). Greedy decoding, in-process, on `--backend`
(`auto`: vLLM where installed, as `coe serve` runs). The tasks are those an embedded expert is
made for (the `general` task is open chat, not closed-form).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from core.catalog import Catalog
from core.prompts import user_prompt
from core.types import Decision, ExpertScore, GenerationParams, Message, Query, Result
from evals.expert_table import MAX_TOKENS
from evals.metrics import paired_interval
from evals.provenance import add_note_argument, module_program, write_summary
from evals.scoring import is_correct
from experts.tasks import TASKS, task_experts
from orchestrator.aggregators import weighted_vote


class Recruiter:
    """A router that recruits the same ranked experts for every query, to be aggregated by `aggregator_expert`."""

    def __init__(self, name: str, ranked: list[str], k: int, aggregator_expert: str):
        self.name, self.ranked, self.k, self.aggregator_expert = name, ranked, k, aggregator_expert

    def route(self, texts, query_ids=None, policy=None, **_):
        return [Decision(query_id=qid, policy=policy or self.name, k=self.k, aggregator="synthesis",
                         aggregator_expert=self.aggregator_expert, explanation="fixed recruitment for the task",
                         ranked=[ExpertScore(expert=e, score=round(1.0 - i / 10, 2)) for i, e in enumerate(self.ranked)])
                for qid in query_ids]


def recruits(catalog: Catalog, task: str) -> list[str]:
    """The task's expert, the base model, then the other task experts in catalog order."""
    experts = task_experts(catalog)
    own = [experts[task]] if task in experts else []
    return [*own, catalog.default_expert, *(e for e in experts.values() if e not in own)]


def score_task(items, results: list[Result]) -> tuple[dict, dict[str, list[int]]]:
    """The columns of one task from the engine's results (the k answers and the synthesis of each),
    and the per-item correctness of synthesis, vote and the best single of the k."""
    experts = [s.expert for s in results[0].decision.chosen]
    per_item: dict[str, list[int]] = {"synthesis": [], "vote": [], "any_of_k": []}
    per_expert: dict[str, list[int]] = {e: [] for e in experts}
    incidents: Counter[str] = Counter()
    for item, result in zip(items, results):
        answers = {a.expert: a for a in result.answers if a.expert in experts}  # a fallback expert's answer is not one of the k
        incidents.update(i.kind for i in result.incidents)
        correct = {e: int(is_correct(item, a.text)) for e, a in answers.items()}
        per_item["synthesis"].append(int(is_correct(item, result.text)))
        per_item["vote"].append(int(is_correct(item, weighted_vote(result.decision, result.answers))))
        per_item["any_of_k"].append(int(any(correct.values())))
        for expert in experts:
            per_expert[expert].append(correct.get(expert, 0))
    n = len(items)
    accuracy = {name: round(sum(right) / n, 4) for name, right in per_item.items()}
    single = {e: round(sum(right) / n, 4) for e, right in per_expert.items()}
    best = max(single, key=single.get)
    agree = sum(s == v for s, v in zip(per_item["synthesis"], per_item["vote"]))
    columns = {"synthesis": per_item["synthesis"], "vote": per_item["vote"], "best_single": per_expert[best]}
    return {"items": n, "experts": experts, "aggregator_expert": results[0].aggregated_by or results[0].decision.aggregator_expert,
            "accuracy": {"synthesis": accuracy["synthesis"], "vote": accuracy["vote"], "best_single": single[best],
                         "any_of_k": accuracy["any_of_k"]},
            "best_single_expert": best, "singles": single, "same_verdict_share": round(agree / n, 4),
            "incidents": dict(incidents)}, columns  # incidents: failures on the way (the engine's retries and fallback answered)


def run(pipeline, tasks: list[str], limit: int, batch: int) -> tuple[dict, dict[str, list[int]]]:
    """Each task's columns, and the per-item correctness of each column over every task's items."""
    per_task, per_item = {}, {"synthesis": [], "vote": [], "best_single": []}
    for task in tasks:
        items = TASKS[task].heldout()[:limit]
        queries = [Query(id=f"{task}-{i}", messages=[Message(role="user", content=user_prompt(item))], policy=f"recruit-{task}",
                         params=GenerationParams(max_tokens=MAX_TOKENS[item.answer_type], temperature=0.0))
                   for i, item in enumerate(items)]
        results: list[Result] = []
        for start in tqdm(range(0, len(queries), batch), desc=f"{task}: k answers + synthesis", unit="batch"):
            results += pipeline.run(queries[start : start + batch])
        per_task[task], columns = score_task(items, results)
        for column, correct in columns.items():
            per_item[column] += correct
    return per_task, per_item


def overall(per_task: dict, per_item: dict[str, list[int]]) -> dict:
    """Item-weighted means over the tasks, how many tasks each column wins or ties, and each
    aggregator's difference from the best single with its 95% interval."""
    n = sum(t["items"] for t in per_task.values())
    columns = ("synthesis", "vote", "best_single", "any_of_k")
    mean = {c: round(sum(t["accuracy"][c] * t["items"] for t in per_task.values()) / n, 4) for c in columns}
    wins = {c: sum(t["accuracy"][c] >= max(t["accuracy"][o] for o in columns[:3]) for t in per_task.values())
            for c in columns[:3]}
    return {"items": n, "accuracy": mean, "tasks_won_or_tied": wins,
            "synthesis_minus_best_single_pp": round(100 * (mean["synthesis"] - mean["best_single"]), 1),
            "vote_minus_best_single_pp": round(100 * (mean["vote"] - mean["best_single"]), 1),
            "interval_95_pp": {f"{c}_minus_best_single": [round(100 * bound, 1) for bound in paired_interval(per_item[c], per_item["best_single"])]
                               for c in ("synthesis", "vote")}}


def write_table(summary: dict, path: Path) -> None:
    """The markdown table, every number from the summary; the verdict sentence from the numbers too."""
    rows = ["| task (items) | experts (k) | synthesis | vote | best single of the k | any of the k |",
            "|---|---|---|---|---|---|"]
    for task, t in summary["tasks"].items():
        a = t["accuracy"]
        rows.append(f"| {task} ({t['items']}) | {', '.join(t['experts'])} | {a['synthesis']:.3f} | {a['vote']:.3f} | "
                    f"{a['best_single']:.3f} ({t['best_single_expert']}) | {a['any_of_k']:.3f} |")
    o = summary["overall"]
    a = o["accuracy"]
    rows.append(f"| all ({o['items']}) | | {a['synthesis']:.3f} | {a['vote']:.3f} | {a['best_single']:.3f} | {a['any_of_k']:.3f} |")
    best = max(("synthesis", "vote", "best_single"), key=lambda c: a[c])
    interval = o["interval_95_pp"]
    verdict = (f"Over all items the best column is `{best}`: synthesis {o['synthesis_minus_best_single_pp']:+.1f} pp "
               f"({interval['synthesis_minus_best_single'][0]:+.1f} to {interval['synthesis_minus_best_single'][1]:+.1f}) and "
               f"vote {o['vote_minus_best_single_pp']:+.1f} pp ({interval['vote_minus_best_single'][0]:+.1f} to "
               f"{interval['vote_minus_best_single'][1]:+.1f}) against the best single of the k "
               f"(synthesis by {summary['aggregator_expert']}; 95% paired bootstrap intervals over the items: one "
               f"holding 0 means these items do not tell the two apart).")
    provenance = summary["provenance"]
    path.write_text("\n".join([*rows, "", verdict, "",
                               f"Backend {summary['backend']}, greedy, {summary['seconds']:.0f} s. "
                               f"Reproduce: `{provenance['command']}`."]) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=None, help="comma-separated expert tasks (experts.tasks; default: every task an expert is made for)")
    parser.add_argument("--limit", type=int, default=60, help="held-out items per task")
    parser.add_argument("--k", type=int, default=3, help="experts recruited per query")
    parser.add_argument("--aggregator-expert", default=None, help="the expert that writes the synthesis (default: the base)")
    parser.add_argument("--batch", type=int, default=32, help="queries per engine batch")
    parser.add_argument("--backend", default="auto", help="the local backend: auto (vllm where installed), vllm or hf")
    parser.add_argument("--config", type=Path, default=None, help="coe config (default: the embedded one)")
    parser.add_argument("--out", type=Path, default=Path("evals/results/bench_aggregators.json"))
    add_note_argument(parser)
    args = parser.parse_args(argv)

    from core.config import load_config
    from core.errors import unknown
    from experts.backends import build_backend, resolve_backend_name
    from orchestrator.pipeline import Pipeline

    settings = load_config(args.config)
    catalog = settings.load_catalog()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(task_experts(catalog))
    for task in tasks:
        if task not in TASKS:
            raise unknown("task", task, TASKS)
    aggregator_expert = args.aggregator_expert or catalog.default_expert
    catalog.get(aggregator_expert)  # an unknown name fails here, with the names there are
    backend_name = resolve_backend_name(args.backend)
    options = settings.backend.options if backend_name == resolve_backend_name(settings.backend.name) else {}
    backend = build_backend(backend_name, catalog, pool=settings.pool, **options)
    routers = {f"recruit-{t}": Recruiter(f"recruit-{t}", recruits(catalog, t), args.k, aggregator_expert) for t in tasks}
    # No per-call time limit: a batch of long answers on a CPU may take minutes, and this measures answers, not latency.
    resilience = settings.resilience.model_copy(update={"timeout_seconds": None})
    pipeline = Pipeline(catalog, backend, routers, f"recruit-{tasks[0]}", resilience, prefetch=settings.pool.prefetch)
    started = time.perf_counter()
    try:
        per_task, per_item = run(pipeline, tasks, args.limit, args.batch)
    finally:
        pipeline.close()
        backend.shutdown()
    summary = {"tasks": per_task, "overall": overall(per_task, per_item), "k": args.k, "aggregator_expert": aggregator_expert,
               "backend": backend_name, "seconds": round(time.perf_counter() - started, 1)}
    write_summary(summary, args.out, args=args, argv=argv, program=module_program(__spec__), backend=backend_name)
    if args.out is not None:
        write_table(summary, args.out.with_suffix(".md"))
    return summary


if __name__ == "__main__":
    main()
