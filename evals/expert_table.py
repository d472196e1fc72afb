"""Every expert and the bare base on every expert's held-out task split.

    python -m evals.expert_table [--limit 150] [--backend hf|vllm] [--dtype auto] [--out evals/results]

Routing only pays when the diagonal wins: each expert should beat the base and the other experts
on its own task. Each task's margin (its expert against the best other) carries a 95% paired
bootstrap interval over the task's items: the noise of a table this size, within which two runs
of the same command can differ (vLLM on CPU batches requests as they arrive, and a step's batch
moves greedy outputs at the margin). Writes expert_task_table.json, .md and a heatmap .png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from core.prompts import user_prompt
from core.types import GenerationParams, GenerationRequest, Message
from evals.metrics import paired_interval
from evals.provenance import add_note_argument, module_program, stamp
from evals.scoring import is_correct
from experts.tasks import TASKS, task_experts

MAX_TOKENS = {"number": 96, "choice": 32, "text": 24}  # room for a chatty base model to reach its number


# Requests per generate call: the transformers backend batches one expert at a time; vLLM takes a
# task's mixed-expert requests in one go (continuous batching, adapters side by side).
CHUNK = {"hf": 32, "vllm": 512}


def score_table(backend, experts: list[str], tasks: list[str], limit: int, chunk: int = 32) -> tuple[dict, dict]:
    """The accuracy table and item counts, and each expert's per-item correctness per task."""
    table: dict[str, dict[str, float]] = {e: {} for e in experts}
    per_item: dict[str, dict[str, list[int]]] = {e: {} for e in experts}
    counts: dict[str, int] = {}
    for task in tasks:
        items = TASKS[task].heldout()[:limit]
        counts[task] = len(items)
        # Expert-major order: each batch runs one expert, the backend's fast path.
        requests = [
            (expert, item, GenerationRequest(expert=expert, messages=[Message(role="user", content=user_prompt(item))],
                                              params=GenerationParams(max_tokens=MAX_TOKENS[item.answer_type])))
            for expert in experts for item in items
        ]
        correct: dict[str, list[int]] = {e: [] for e in experts}
        for start in tqdm(range(0, len(requests), chunk), desc=f"{task} x {len(experts)} experts", unit="batch"):
            part = requests[start : start + chunk]
            for (expert, item, _), answer in zip(part, backend.generate([r for _, _, r in part])):
                correct[expert].append(int(is_correct(item, answer.text)))
        for e in experts:
            table[e][task] = round(sum(correct[e]) / len(items), 4)
            per_item[e][task] = correct[e]
    return {"accuracy": table, "items": counts}, per_item


def diagonal_wins(table: dict, expert_of_task: dict[str, str]) -> dict[str, bool]:
    acc = table["accuracy"]
    return {task: all(acc[expert][task] > acc[other][task] for other in acc if other != expert)
            for task, expert in expert_of_task.items()}


def diagonal_margins(table: dict, per_item: dict, expert_of_task: dict[str, str]) -> dict[str, dict]:
    """Per task: its expert's accuracy minus the best other's (the base included), with the 95%
    paired bootstrap interval of that difference over the task's items."""
    acc = table["accuracy"]
    margins = {}
    for task, expert in expert_of_task.items():
        runner_up = max((other for other in acc if other != expert), key=lambda other: acc[other][task])
        low, high = paired_interval(per_item[expert][task], per_item[runner_up][task])
        margins[task] = {"expert": expert, "runner_up": runner_up, "margin": round(acc[expert][task] - acc[runner_up][task], 4),
                         "interval_95": [round(low, 4), round(high, 4)]}
    return margins


def write_reports(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    (out / "expert_task_table.json").write_text(json.dumps(result, indent=2) + "\n")
    acc, tasks = result["accuracy"], list(result["items"])
    lines = ["| expert | " + " | ".join(f"{t} (n={result['items'][t]})" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for expert, row in acc.items():
        cells = []
        for t in tasks:
            best = max(acc[e][t] for e in acc)
            cells.append(f"**{row[t]:.3f}**" if row[t] == best else f"{row[t]:.3f}")
        lines.append(f"| {expert} | " + " | ".join(cells) + " |")
    wins = result["diagonal_wins"]
    lines += ["", "Diagonal wins (the task's expert beats the base and every other expert): "
              + ", ".join(f"{t}: {'yes' if w else 'NO'}" for t, w in wins.items()),
              "", "Margin of each task's expert over the best other expert, with its 95% paired bootstrap interval over "
              "the task's items (an interval holding 0: these items do not tell the two apart): "
              + "; ".join(f"{t}: {m['expert']} {m['margin']:+.3f} over {m['runner_up']} "
                          f"({m['interval_95'][0]:+.3f} to {m['interval_95'][1]:+.3f})" for t, m in result["margins"].items()) + ".",
              "", f"Backend {result['backend']}, greedy decoding, {result['seconds']:.0f} s. "
              f"Reproduce: `{result['provenance']['command']}` (machine and commit in expert_task_table.json)."]
    (out / "expert_task_table.md").write_text("\n".join(lines) + "\n")

    matrix = np.array([[acc[e][t] for t in tasks] for e in acc])
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 0.6 * len(acc) + 1.5))
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(0.01, matrix.max()))
    ax.set_xticks(range(len(tasks)), [f"{t}\n(n={result['items'][t]})" for t in tasks])
    ax.set_yticks(range(len(acc)), list(acc))
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w" if matrix[i, j] < matrix.max() * 0.6 else "k")
    ax.set_title("Accuracy of each expert on each held-out task")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(out / "expert_task_table.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=150, help="held-out items per task")
    parser.add_argument("--backend", choices=sorted(CHUNK), default="hf", help="what runs the experts")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU runs it natively, else float32")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    add_note_argument(parser)
    args = parser.parse_args(argv)

    from core.catalog import load_catalog
    from experts.backends import build_backend
    from experts.backends.dtype import resolve_dtype

    catalog = load_catalog()
    expert_of_task = task_experts(catalog)
    experts = [catalog.default_expert, *expert_of_task.values()]
    dtype = resolve_dtype(args.dtype)
    backend = build_backend(args.backend, catalog, dtype=dtype)
    started = time.perf_counter()
    try:
        result, per_item = score_table(backend, experts, list(expert_of_task), args.limit, CHUNK[args.backend])
    finally:
        if hasattr(backend, "shutdown"):
            backend.shutdown()
    result.update(
        diagonal_wins=diagonal_wins(result, expert_of_task), margins=diagonal_margins(result, per_item, expert_of_task),
        backend=f"{args.backend} {dtype}",
        seconds=round(time.perf_counter() - started, 1),
    )
    stamp(result, args=args, argv=argv, program=module_program(__spec__), backend=f"{args.backend} {dtype}")
    write_reports(result, args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
