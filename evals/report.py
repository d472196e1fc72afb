"""Reports of benchmark runs: a summary JSON, a markdown report and plots per run, and several runs
side by side (`coe eval compare DIR...`).

Every number in a summary is computed from the run's results.jsonl, so a resumed run reports on
all of its items, not only those of the last session.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from core.errors import CoeError
from evals.plots import finish, pyplot
from evals.provenance import stamp
from evals.store import RESULTS_FILE, RUN_FILE, ResultStore, RunConfig

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
CATEGORY_PLOT = "category_accuracy.png"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], config: RunConfig, session_seconds: float | None = None) -> dict:
    backend = config.backend or "unknown"
    scored = [r for r in records if r["correct"] is not None]
    by_category: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_category[r["category"]].append(r)
    ratings = [x for r in records for x in (r.get("judge_ratings") or []) if x is not None]
    experts = Counter(e for r in records for e in r["experts"])
    active = [r["active_params"] for r in records if r.get("active_params") is not None]
    summary = {
        "benchmark": config.benchmark, "policy": config.policy, "backend": backend,
        "via": config.via, "replay": config.replay, "items": len(records), "scored": len(scored),
        "accuracy": _mean([float(r["correct"]) for r in scored]),
        "categories": {
            name: {"items": len(rows), "accuracy": _mean([float(r["correct"]) for r in rows if r["correct"] is not None])}
            for name, rows in sorted(by_category.items())
        },
        "tokens": {"prompt": sum(r["prompt_tokens"] for r in records), "completion": sum(r["completion_tokens"] for r in records)},
        "wall_seconds": sum(r["wall_seconds"] for r in records),
        "load_seconds": sum(r["load_seconds"] for r in records),  # moving experts between tiers
        "load_wait_seconds": sum(r.get("load_wait_seconds", 0.0) for r in records),  # of which batches waited for
        "load_seconds_simulated": backend == "replay",  # replay experts' loads are simulated from bytes and bandwidths
        "generate_seconds": sum(r["generate_seconds"] for r in records),
        "expert_calls": dict(experts.most_common()),
        "mean_active_params": _mean(active),
        "truncated_answers": sum(1 for r in records if r["finish_reason"] == "length"),
    }
    if config.judge or ratings:
        summary["judge"] = {"model": config.judge, "mean_rating": _mean(ratings), "ratings": len(ratings)}
    if session_seconds is not None:
        summary["last_session_seconds"] = session_seconds
    return summary


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(summary: dict) -> str:
    s = summary
    lines = [f"# {s['benchmark']} / {s['policy']}", "",
             f"Backend `{s['backend']}`" + (f" via {s['via']}" if s["via"] else "") + (f", replaying `{s['replay']}`" if s["replay"] else ""),
             "", "| items | scored | accuracy | prompt tokens | completion tokens | wall s | load s | load wait s | generate s | mean active params |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| {s['items']} | {s['scored']} | {_fmt(s['accuracy'], 4)} | {s['tokens']['prompt']} | {s['tokens']['completion']} | "
             f"{s['wall_seconds']:.1f} | {s['load_seconds']:.2f}{' (simulated)' if s['load_seconds_simulated'] else ''} | "
             f"{s['load_wait_seconds']:.2f} | "
             f"{s['generate_seconds']:.1f} | {_params(s['mean_active_params'])} |", ""]
    if "judge" in s:
        lines += [f"Judge `{s['judge']['model']}`: mean rating {_fmt(s['judge']['mean_rating'], 2)} over {s['judge']['ratings']} ratings.", ""]
    lines += ["## Per category", "", "| category | items | accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {c['items']} | {_fmt(c['accuracy'], 4)} |" for name, c in s["categories"].items()]
    lines += ["", "## Expert calls", "", "| expert | calls |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in s["expert_calls"].items()]
    lines += ["", f"![per-category accuracy]({CATEGORY_PLOT})", ""]
    return "\n".join(lines)


def _params(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1e9:.1f}B" if value >= 1e9 else f"{value / 1e6:.0f}M"


def plot_categories(summaries: list[dict], path: Path, title: str) -> None:
    """Per-category accuracy, one bar per run (policy) in each category."""
    import numpy as np

    plt = pyplot()
    categories = sorted({c for s in summaries for c, v in s["categories"].items() if v["accuracy"] is not None})
    if not categories:
        return
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(min(18, max(6, 1.0 + len(categories) * (0.22 * len(summaries) + 0.3))), 4.8))
    x = np.arange(len(categories))
    for n, s in enumerate(summaries):
        values = [s["categories"].get(c, {}).get("accuracy") or 0.0 for c in categories]
        ax.bar(x + n * width - 0.4 + width / 2, values, width, label=s["policy"])
    ax.set_xticks(x, categories, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    finish(fig, ax, path, title, grid_axis="y")


def plot_cost_accuracy(summaries: list[dict], path: Path, title: str) -> None:
    """Accuracy against cost across runs: mean active parameters per query, and load seconds per query."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, (key, label) in zip(axes, [("mean_active_params", "mean active parameters per query (billions)"),
                                       ("load_seconds", "load/switch seconds per query")]):
        for s in summaries:
            if s["accuracy"] is None or s.get(key) is None:
                continue
            x = s[key] / 1e9 if key == "mean_active_params" else s[key] / max(1, s["items"])
            ax.scatter([x], [s["accuracy"]], s=60)
            ax.annotate(s["policy"], (x, s["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        simulated = any(s.get("load_seconds_simulated") for s in summaries) and key == "load_seconds"
        ax.set_xlabel(label + (" (simulated)" if simulated else ""))
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (out / REPORT_FILE).write_text(markdown(summary))
    plot_categories([summary], out / CATEGORY_PLOT, f"{summary['benchmark']} / {summary['policy']}: accuracy per category")


def load_summary(directory: Path) -> dict:
    """A run's summary, recomputed from its results (so it is current even if the run was cut off)."""
    run_file, results = directory / RUN_FILE, directory / RESULTS_FILE
    if not run_file.is_file() or not results.is_file():
        raise CoeError(f"{directory} is not a run directory (no {RUN_FILE} and {RESULTS_FILE})", "pass directories written by coe eval run")
    config = RunConfig.model_validate(json.loads(run_file.read_text()))
    records = list(ResultStore(results).load().values())
    return summarize(records, config)


def compare(directories: list[Path], out: Path | None = None) -> tuple[list[dict], str]:
    """Several runs side by side: a markdown table, and with `out` the table, JSON and plots there."""
    summaries = [load_summary(d) for d in directories]
    lines = ["| run | benchmark | policy | backend | items | accuracy | mean active params | tokens | wall s | load s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d, s in zip(directories, summaries):
        lines.append(f"| {d.name} | {s['benchmark']} | {s['policy']} | {s['backend']} | {s['items']} | {_fmt(s['accuracy'], 4)} | "
                     f"{_params(s['mean_active_params'])} | {s['tokens']['prompt'] + s['tokens']['completion']} | "
                     f"{s['wall_seconds']:.1f} | {s['load_seconds']:.2f}{' (sim.)' if s['load_seconds_simulated'] else ''} |")
    categories = sorted({c for s in summaries for c in s["categories"]})
    if len(categories) > 1:
        lines += ["", "| category | " + " | ".join(s["policy"] for s in summaries) + " |", "|---|" + "---|" * len(summaries)]
        lines += [f"| {c} | " + " | ".join(_fmt(s["categories"].get(c, {}).get("accuracy"), 3) for s in summaries) + " |"
                  for c in categories]
    table = "\n".join(lines) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        runs = [{"directory": str(d), **s} for d, s in zip(directories, summaries)]
        (out / "compare.json").write_text(json.dumps(stamp({"runs": runs}), indent=2) + "\n")
        (out / "compare.md").write_text(table + "\n![per category](compare_categories.png)\n\n![cost vs accuracy](compare_cost.png)\n")
        title = ", ".join(sorted({s["benchmark"] for s in summaries}))
        plot_categories(summaries, out / "compare_categories.png", f"{title}: accuracy per category by policy")
        plot_cost_accuracy(summaries, out / "compare_cost.png", f"{title}: cost vs accuracy")
    return summaries, table
