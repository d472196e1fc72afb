"""Regenerate the router results under evals/results/routers/: every router and baseline on
MMLU-Pro, LLMRouter and RouteLLM (tuned and at defaults), adaptive k (cascades), routing with
the conversation, the bounded LLM-extractor comparison, GLIDER's local gates on the embedded LoRA
pool, and issue 16's targets worded from the run's own numbers.

    python -m evals.run_router_table [--only mmlu_pro] [--llm-sample 300] [--no-llm] [--no-pool] [--no-datasets]
                                     [--no-cascade] [--no-history]

Embeddings and LLM outputs are cached on disk (see routers/embedder.py, routers/llm_writer.py):
the first run embeds ~30k questions (tens of minutes on a CPU), later runs take minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from evals.metrics import BOOTSTRAP_RESAMPLES
from evals.outcomes import load_outcomes
from evals.plots import finish, pyplot
from evals.provenance import KEY, stamp
from evals.router_eval import OfflineResult, evaluate_offline, plot_curves

OUT = Path(__file__).resolve().parent / "results" / "routers"
LATENCY = OUT.parent / "bench_route_latency.json"  # evals.bench_route_latency, run before this table
DATASETS = ("mmlu_pro", "llmrouter", "routellm")
# (router, k, label suffix, how its options come): "tuned" searches TUNING_GRIDS on the validation
# part of train; "dc encoder" runs the router over the dc router's fine-tuned encoder with the
# options tuned for it on the default embeddings (an encoder trained without the validation part
# would be needed to tune it there honestly).
RUNS = [("knn", None, ""), ("coe", None, ""), ("glider", None, ""), ("symbolic", 1, ""), ("symbolic", 3, ""),
        ("cluster", None, ""), ("mf", None, ""), ("dc", None, ""), ("knn", None, "dc encoder"),
        ("cluster", None, "dc encoder"), ("best", None, "")]
# The dc encoder's training budget per data set (CPU minutes: ~20 for 150 steps of 32 queries on
# this shared 2-core machine); the defaults (150 steps) on MMLU-Pro, fewer where time ran short.
DC_OPTIONS = {"mmlu_pro": {}, "llmrouter": {"max_steps": 80}, "routellm": {"max_steps": 80}}
CASCADE_ROUTERS = ("knn", "mf", "best")
HISTORY_ROUTERS = ("knn", "cluster", "mf", "best")
LATENCY_DATASET = "mmlu_pro"
NEW_FAMILIES = ("cluster", "mf", "dc", "best")
TARGET_GAIN = 0.03  # MMLU-Pro and LLMRouter: +3.0 pp over the single best
TARGET_COST_RATIO = 0.75
TARGET_CASCADE_GAIN, TARGET_CASCADE_EXPERTS = 0.045, 1.5
TARGET_APGR = 0.75
TARGET_FLOOR = -0.005  # every router at defaults >= single best - 0.5 pp
TARGET_LATENCY_MS = 15.0


def label_of(router: str, k: int, suffix: str) -> str:
    return router + (f" k={k}" if k > 1 else "") + (f" ({suffix})" if suffix else "")


def row_of(result: OfflineResult, default_accuracy: float | None, label: str) -> dict:
    s = result.summary
    return {
        "router": s["router"], "label": label, "k": s["k"], "accuracy": s["accuracy"], "cost": s["cost"],
        "vs_single_best": s["accuracy"] - s["best_single_accuracy"], "vs_single_best_interval": s["vs_single_best_interval"],
        "default_options_accuracy": default_accuracy,
        "apgr": s["apgr"], "cpt50": s["cpt50"], "cpt80": s["cpt80"], "options": s["options"],
        "route_ms_p50": s.get("route_ms_p50"), "route_ms_p50_batch64_no_embedding": s.get("route_ms_p50_batch64_no_embedding"),
        "validation_accuracy": s.get("validation_accuracy"), "validation_single_best_accuracy": s.get("validation_single_best_accuracy"),
        "knob_points": s.get("knob_points"), "encoder": s.get("encoder"),
    }


def dc_encoder(name: str, train) -> str:
    """The dc router's fine-tuned encoder for this training set (trained once, then cached)."""
    from evals.router_eval import embeddings_for, make_router

    return make_router("dc", DC_OPTIONS.get(name, {}), train.cost_table).fit(train.data, embeddings_for(train)).encoder


def run_dataset(name: str, cascades: bool = True, history: bool = True) -> dict:
    from evals.router_eval import _FITTED, TUNING_GRIDS, evaluate_cascade, evaluate_history

    _FITTED.clear()  # fitted routers are reused within a data set only
    train, test = load_outcomes(f"{name}:train"), load_outcomes(f"{name}:test")
    results, rows, tuned_options = [], [], {}
    for router, k, suffix in RUNS:
        started = time.perf_counter()
        label = label_of(router, k or 1, suffix)
        latency = name == LATENCY_DATASET
        if suffix == "dc encoder":
            options = {**tuned_options.get(router, {}), "encoder": dc_encoder(name, train)}
            tuned = evaluate_offline(router, train, test, k=k, options=options, tune_options=False, latency=latency, progress=True)
            default_accuracy = None
        else:
            # dc is not validated: that would train a second encoder, without the validation part.
            tuned = evaluate_offline(router, train, test, k=k, options=DC_OPTIONS.get(name, {}) if router == "dc" else None,
                                     latency=latency, progress=True, validate=router != "dc")
            tuned_options[router] = {key: v for key, v in tuned.summary["options"].items() if key != "k"}
            if router in TUNING_GRIDS:
                default_accuracy = evaluate_offline(router, train, test, k=k, tune_options=False, latency=False).summary["accuracy"]
            else:
                default_accuracy = tuned.summary["accuracy"]  # nothing tuned: the defaults are the row
        tuned.summary["label"] = label
        results.append(tuned)
        rows.append(row_of(tuned, default_accuracy, label))
        print(f"{name} {label}: {tuned.summary['accuracy']:.4f} (defaults {fmt(default_accuracy)}) "
              f"vs single best {tuned.summary['best_single_accuracy']:.4f}, cost {tuned.summary['cost']:.1f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    first = results[0].summary
    baselines = {
        "single_best": {"model": first["best_single"], "accuracy": first["best_single_accuracy"], "cost": first["best_single_cost"]},
        "oracle": {"accuracy": first["oracle_accuracy"], "cost": first["oracle_cost"]},
        "random": {"accuracy": first["random_accuracy"], "cost": first["random_cost"]},
        "weak": {"model": first["weak_model"], "accuracy": first["weak_accuracy"], "cost": first["weak_cost"]},
    }
    cascade_rows = []
    if cascades:
        for router in CASCADE_ROUTERS:
            started = time.perf_counter()
            cascade_rows.append(evaluate_cascade(router, train, test, tuned_options[router]))
            c = cascade_rows[-1]
            print(f"{name} cascade {router}: {c['accuracy']:.4f} at {c['experts']:.2f} experts/query "
                  f"(k=1 {c['k1']['accuracy']:.4f}, k=3 {c['k_all']['accuracy']:.4f}), {time.perf_counter() - started:.0f} s", flush=True)
    history_rows = []
    if history:
        for router in HISTORY_ROUTERS:
            started = time.perf_counter()
            history_rows.append(evaluate_history(router, train, test, tuned_options[router]))
            print(f"{name} history {router}: {history_rows[-1]['test']}, {time.perf_counter() - started:.0f} s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps([r.as_json() for r in results], indent=1))
    plot_curves(results, OUT / f"{name}.png", f"{name}: accuracy vs cost over the cost knob (test split)")
    if cascade_rows:
        plot_cascades(cascade_rows, rows, baselines, OUT / f"{name}_cascade.png", f"{name}: adaptive k (test split)")
    return {"dataset": name, "n_train": first["n_train"], "n_test": first["n_test"], "experts": first["experts"],
            "baselines": baselines, "rows": rows, "cascade": cascade_rows, "history": history_rows}


def plot_cascades(cascades: list[dict], rows: list[dict], baselines: dict, path: Path, title: str) -> None:
    """Accuracy against experts called per query over the cascade threshold, fixed k = 3 as a mark."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for c in cascades:
        points = sorted(c["curve"], key=lambda p: p["experts"])
        ax.plot([p["experts"] for p in points], [p["accuracy"] for p in points], marker=".", label=f"{c['router']} cascade (k <= {c['k']})")
        ax.scatter([c["experts"]], [c["accuracy"]], s=70, zorder=5)
    for r in rows:
        if r["router"] == "symbolic" and r["k"] > 1:
            ax.scatter([r["k"]], [r["accuracy"]], marker="s", s=80, color="black", label=f"symbolic fixed k={r['k']}", zorder=5)
    ax.axhline(baselines["single_best"]["accuracy"], color="red", linestyle="--", linewidth=0.8, label="single best")
    ax.set_xlabel("experts called per query (mean)")
    ax.set_ylabel("accuracy")
    finish(fig, ax, path, title)


def spread_sample(rows: int, size: int) -> np.ndarray:
    """Evenly spaced rows: the files are ordered by category, so a prefix would be one subject."""
    return np.unique(np.linspace(0, rows - 1, min(size, rows)).astype(int))


def run_llm_extractors(sample: int) -> dict:
    """Symbolic's skill extractors and GLIDER's instructions, embedding vs LLM, on the same bounded sample."""
    train, test = load_outcomes("mmlu_pro:train"), load_outcomes("mmlu_pro:test")
    test = test.take(spread_sample(len(test.data.texts), sample))
    rows = []
    for router, k, extractor in [("symbolic", 3, "embedding"), ("symbolic", 3, "llm"), ("symbolic", 1, "embedding"),
                                 ("symbolic", 1, "llm"), ("glider", 1, "query"), ("glider", 1, "llm")]:
        started = time.perf_counter()
        result = evaluate_offline(router, train, test, k=k, latency=False, progress=True, extractor=extractor)
        s = result.summary
        rows.append({"router": router, "k": k, "source": extractor, "accuracy": s["accuracy"],
                     "cost": s["cost"], "best_single_accuracy": s["best_single_accuracy"], "options": s["options"],
                     "seconds": time.perf_counter() - started})
        print(f"sample {router} k={k} {rows[-1]['source']}: {s['accuracy']:.4f} vs single best {s['best_single_accuracy']:.4f}", flush=True)
    return {"dataset": "mmlu_pro:test", "sample": len(test.data.texts), "rows": rows}


def run_pool_gates(per_task: int = 40) -> dict:
    """GLIDER on the embedded LoRA pool: share of held-out task questions routed to their expert,
    global router alone and with the local gates on SmolLM2 token states."""
    from core.catalog import load_catalog
    from core.prompts import user_prompt
    from evals.router_eval import cached_embed
    from experts.helpers import router_helpers
    from experts.tasks import TASKS, task_experts
    from routers import build_router
    from routers.base import catalog_examples

    catalog = load_catalog()
    helpers = router_helpers(catalog)
    examples = catalog_examples(catalog, 300)
    vectors = cached_embed(examples.texts)
    expert_of = task_experts(catalog)
    questions = [(task, user_prompt(item)) for task in sorted(expert_of) for item in TASKS[task].heldout()[:per_task]]
    texts = [q for _, q in questions]
    rows = []
    for local_weight in (0.0, 0.5, 1.0):
        started = time.perf_counter()
        router = build_router("glider", helpers, embed=cached_embed, local_weight=local_weight,
                              fallback_expert=catalog.default_expert)
        router.fit(examples, vectors)
        fitted = time.perf_counter()
        decisions = router.route(texts, embeddings=cached_embed(texts))
        hits = [d.chosen[0].expert == expert_of[task] for d, (task, _) in zip(decisions, questions)]
        per_task_hits = {task: float(np.mean([h for h, (t, _) in zip(hits, questions) if t == task])) for task in sorted(expert_of)}
        rows.append({"local_weight": local_weight, "routed_to_own_expert": float(np.mean(hits)), "per_task": per_task_hits,
                     "fit_seconds": fitted - started, "route_seconds": time.perf_counter() - fitted})
        print(f"pool glider local_weight={local_weight}: {np.mean(hits):.3f} {per_task_hits}", flush=True)
    return {"questions": len(texts), "per_task": per_task, "rows": rows}


def fmt(value, digits=4):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pp(value: float) -> str:
    return f"{100 * value:+.1f} pp"


def pp_interval(interval) -> str:
    """A 95% interval of a difference, in points: `-0.3 to +1.7 pp`."""
    if interval is None:
        return "not computed"
    low, high = interval
    return f"{100 * low:+.1f} to {100 * high:+.1f} pp"


def interval_cell(interval) -> str:
    return "—" if interval is None else f"{interval[0]:+.4f} to {interval[1]:+.4f}"


def dataset_summary(table: dict) -> list[str]:
    """Which router won on this data set and by how much, and how the new families did against knn."""
    rows, sb = table["rows"], table["baselines"]["single_best"]
    affordable = [r for r in rows if r["cost"] <= sb["cost"] + 1e-9] or rows
    top = max(affordable, key=lambda r: r["accuracy"])
    knn = next(r for r in rows if r["label"] == "knn")
    lines = [f"At no more than the single best's cost, the most accurate router here is **{top['label']}**: "
             f"{top['accuracy']:.4f}, {pp(top['vs_single_best'])} over the single best ({sb['model']}, {sb['accuracy']:.4f}; "
             f"95% interval {pp_interval(top['vs_single_best_interval'])}) at {top['cost'] / sb['cost']:.2f}x its cost."]
    for r in rows:
        if r["router"] in NEW_FAMILIES or "dc encoder" in r["label"]:
            verdict = "beats" if r["accuracy"] > knn["accuracy"] else "does not beat"
            lines.append(f"- {r['label']}: {r['accuracy']:.4f} ({pp(r['vs_single_best'])} over the single best, "
                         f"95% interval {pp_interval(r['vs_single_best_interval'])}), "
                         f"{verdict} knn ({knn['accuracy']:.4f}, {pp(r['accuracy'] - knn['accuracy'])}).")
    return lines + [""]


def best_vs_knn(tables: list[dict]) -> list[str]:
    """The default-policy question, decided on the validation part of train only."""
    lines = ["## `best` against `knn` on the validation part of train (decides the default policy)", "",
             "| data set | knn validation | best validation | best - knn |", "|---|---|---|---|"]
    wins = []
    for table in tables:
        knn = next((r for r in table["rows"] if r["label"] == "knn"), None)
        best = next((r for r in table["rows"] if r["label"] == "best"), None)
        if not knn or not best or knn["validation_accuracy"] is None or best["validation_accuracy"] is None:
            continue
        gap = best["validation_accuracy"] - knn["validation_accuracy"]
        wins.append(gap > 0)
        lines.append(f"| {table['dataset']} | {knn['validation_accuracy']:.4f} | {best['validation_accuracy']:.4f} | {pp(gap)} |")
    if wins:
        verdict = ("`best` beats `knn` on every data set's validation part: it qualifies as the default policy."
                   if all(wins) else f"`best` beats `knn` on {sum(wins)} of {len(wins)} data sets' validation parts: "
                   "`knn` stays the default policy.")
        lines += ["", verdict]
    return lines + [""]


def cascade_section(tables: list[dict]) -> list[str]:
    lines = ["## Adaptive k (a cascade over the top 3)", "",
             "The router ranks experts; the first answers, and the next is called only while the best predicted success "
             "among those that answered is below the threshold; the answers are fused by a vote weighted by predicted "
             f"success. The threshold is chosen on the validation part of train (most accurate at <= {TARGET_CASCADE_EXPERTS} "
             "experts per query on average) and applied to test. Symbolic-MoE's fixed k = 3 is the baseline.", ""]
    for table in tables:
        if not table.get("cascade"):
            continue
        sb = table["baselines"]["single_best"]["accuracy"]
        lines += ["| data set | router | threshold | accuracy | vs single best | experts/query | cost | k=1 | k=3 (all) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in table.get("cascade", []):
            lines.append(f"| {table['dataset']} | {c['router']} | {c['threshold']:.3f} | {c['accuracy']:.4f} | {pp(c['accuracy'] - sb)} | "
                         f"{c['experts']:.2f} | {c['cost']:.1f} | {c['k1']['accuracy']:.4f} | {c['k_all']['accuracy']:.4f} ({c['k_all']['experts']:.2f}) |")
        for r in table["rows"]:
            if r["router"] == "symbolic" and r["k"] > 1:
                lines.append(f"| {table['dataset']} | symbolic fixed k={r['k']} | — | {r['accuracy']:.4f} | {pp(r['vs_single_best'])} | "
                             f"{r['k']} | {r['cost']:.1f} | | |")
        lines += ["", f"![{table['dataset']} cascade]({table['dataset']}_cascade.png)", ""]
    return lines + [""]


def history_section(tables: list[dict]) -> list[str]:
    lines = ["## Conversations: routing turn 2 with turn 1 mixed in", "",
             "Two-turn conversations built from the test rows: turn 2 is each test question, turn 1 another question of "
             "the same category or of another one. Embedding routers mix turn 1's embedding into turn 2's with "
             "`history_weight` (0 = the last message alone). The weight is chosen on the validation part of train "
             "(mean of the two kinds); the table gives turn-2 accuracy on test.", ""]
    weights = None
    for table in tables:
        for h in table.get("history", []):
            weights = list(h["test"]["same category"])
            break
    if not weights:
        return []
    lines += ["| data set | router | turn 1 | " + " | ".join(f"w={w}" for w in weights) + " | chosen w | chosen - w=0 |",
              "|---|---|---|" + "---|" * len(weights) + "---|---|"]
    for table in tables:
        for h in table.get("history", []):
            for kind, by_weight in h["test"].items():
                chosen = by_weight[str(h["chosen_weight"])] if str(h["chosen_weight"]) in by_weight else by_weight[str(int(h["chosen_weight"]))]
                lines.append(f"| {table['dataset']} | {h['router']} | {kind} | " + " | ".join(f"{by_weight[w]:.4f}" for w in weights)
                             + f" | {h['chosen_weight']} | {pp(chosen - by_weight[weights[0]])} |")
    runs = [h for table in tables for h in table.get("history", [])]
    alone = sum(h["chosen_weight"] == 0 for h in runs)
    lines += ["", f"Validation chose the last message alone (w = 0) in {alone} of {len(runs)} router and data set pairs: when the "
              "second turn is a self-contained question, the first turn adds no routing signal. The default `history_weight` "
              "is small (routers/base.py) so that a vague follow-up can still lean on the conversation."]
    return lines + [""]


def targets_section(tables: dict[str, dict]) -> list[str]:
    """Issue 16's targets, per router family, from this run's numbers."""
    lines = ["## Targets (issue 16), from this run's numbers", ""]

    def mark(ok: bool) -> str:
        return "met" if ok else "not met"

    mmlu = tables.get("mmlu_pro")
    if mmlu:
        sb = mmlu["baselines"]["single_best"]
        lines += [f"MMLU-Pro, two points of one router's cost-quality curve (cost knob thresholds chosen on the validation "
                  f"part of train, applied to test; single best {sb['model']}: {sb['accuracy']:.4f} at cost {sb['cost']:.1f}):", "",
                  "| router | most accurate at <= single best's cost | vs single best | target +3.0 pp | cheapest at >= single best's accuracy | cost ratio | target <= 0.75x |",
                  "|---|---|---|---|---|---|---|"]
        for r in mmlu["rows"]:
            points = r.get("knob_points") or {}
            a, c = points.get("best_at_single_cost"), points.get("cheapest_at_single_accuracy")
            if not a and not c:
                continue
            a_text = f"{a['accuracy']:.4f} (cost {a['cost']:.1f})" if a else "—"
            a_gain = a["accuracy"] - sb["accuracy"] if a else None
            a_ok = a is not None and a_gain >= TARGET_GAIN and a["cost"] <= sb["cost"] + 1e-9
            c_ratio = c["cost"] / sb["cost"] if c else None
            c_ok = c is not None and c["accuracy"] >= sb["accuracy"] and c_ratio <= TARGET_COST_RATIO
            c_text = f"{c['accuracy']:.4f} (cost {c['cost']:.1f})" if c else "—"
            lines.append(f"| {r['label']} | {a_text} | {pp(a_gain) if a_gain is not None else '—'} | {mark(a_ok)} | {c_text} | "
                         f"{f'{c_ratio:.2f}x' if c_ratio is not None else '—'} | {mark(c_ok)} |")
        lines.append("")
        cascades = mmlu.get("cascade", [])
        if cascades:
            lines += ["MMLU-Pro adaptive k (target: >= +4.5 pp at <= 1.5 experts per query):", ""]
            for c in cascades:
                gain = c["accuracy"] - sb["accuracy"]
                ok = gain >= TARGET_CASCADE_GAIN and c["experts"] <= TARGET_CASCADE_EXPERTS
                lines.append(f"- {c['router']} cascade: {pp(gain)} at {c['experts']:.2f} experts/query: {mark(ok)}.")
            symbolic = next((r for r in mmlu["rows"] if r["router"] == "symbolic" and r["k"] > 1), None)
            if symbolic:
                lines.append(f"- baseline symbolic fixed k={symbolic['k']}: {pp(symbolic['vs_single_best'])} at {symbolic['k']} experts/query.")
            lines.append("")
    llmrouter = tables.get("llmrouter")
    if llmrouter:
        best = max(llmrouter["rows"], key=lambda r: r["vs_single_best"])
        lines += ["LLMRouter (target: >= +3.0 pp over the single best): " + "; ".join(
            f"{r['label']} {pp(r['vs_single_best'])}" for r in llmrouter["rows"]) +
            f". Best: {best['label']} {pp(best['vs_single_best'])} (95% interval {pp_interval(best['vs_single_best_interval'])}): "
            f"{mark(best['vs_single_best'] >= TARGET_GAIN)}.", ""]
    routellm = tables.get("routellm")
    if routellm:
        rows = [r for r in routellm["rows"] if r["apgr"] is not None and r["apgr"] == r["apgr"]]
        best = max(rows, key=lambda r: r["apgr"]) if rows else None
        if best:
            lines += ["RouteLLM (target: APGR >= 0.75 with the cost knob): " + "; ".join(f"{r['label']} {r['apgr']:.3f}" for r in rows)
                      + f". Best: {best['label']} {best['apgr']:.3f}: {mark(best['apgr'] >= TARGET_APGR)}.", ""]
    below = [(name, r["label"], r["default_options_accuracy"] - t["baselines"]["single_best"]["accuracy"])
             for name, t in tables.items() for r in t["rows"] if r["default_options_accuracy"] is not None
             and r["default_options_accuracy"] - t["baselines"]["single_best"]["accuracy"] < TARGET_FLOOR]
    lines += ["Every router at its defaults >= the single best - 0.5 pp on every data set: "
              + ("met." if not below else "not met: " + "; ".join(f"{label} on {name} {100 * gap:+.2f} pp" for name, label, gap in below) + "."), ""]
    if LATENCY.is_file():
        bench = json.loads(LATENCY.read_text())
        slow = [name for name, r in bench["routers"].items() if r["p50_ms"] > TARGET_LATENCY_MS]
        load = bench["load_average_before"][0]
        cores = bench[KEY]["machine"]["cores_usable"]
        lines += [f"Latency, interleaved in one process (`{bench[KEY]['command']}`, {bench['queries']} MMLU-Pro queries, load average "
                  f"{load:.1f} on {cores} cores before it{', so not an idle machine' if load >= 1 else ''}): "
                  + "; ".join(f"{name} {r['p50_ms']:.1f} ms ({r.get('p50_vs_knn', 1.0):.2f}x knn)" for name, r in bench["routers"].items())
                  + (f". <= {TARGET_LATENCY_MS:.0f} ms: met by every router." if not slow else f". Above {TARGET_LATENCY_MS:.0f} ms: {', '.join(slow)}."), ""]
    if mmlu:
        timed = [r for r in mmlu["rows"] if r["route_ms_p50"] is not None]
        slow = [r for r in timed if r["route_ms_p50"] > TARGET_LATENCY_MS]
        lines += [f"Latency in the table run (batch-1 p50 with the embedding <= {TARGET_LATENCY_MS:.0f} ms on MMLU-Pro; each router "
                  "measured at a different time of a shared, loaded machine): "
                  + "; ".join(f"{r['label']} {r['route_ms_p50']:.1f} ms" for r in timed)
                  + (". Met by every router." if not slow else f". Not met by: {', '.join(r['label'] for r in slow)}."), ""]
    return lines


def llm_prose(llm: dict) -> str:
    """What the LLM-extractor rows show, worded from their numbers."""
    parts = []
    by = {(r["router"], r["k"], r["source"]): r["accuracy"] for r in llm["rows"]}
    for router, k, embedded, written in (("symbolic", 3, "embedding", "llm"), ("symbolic", 1, "embedding", "llm"), ("glider", 1, "query", "llm")):
        if (router, k, embedded) in by and (router, k, written) in by:
            gap = by[(router, k, written)] - by[(router, k, embedded)]
            verb = "beats" if gap > 0 else ("ties with" if gap == 0 else "trails")
            parts.append(f"{router} k={k}: the LLM side {verb} the embeddings ({pp(gap)}, "
                         f"{round(abs(gap) * llm['sample'])} of {llm['sample']} questions)")
    return "On this sample " + "; ".join(parts) + "." if parts else ""


def markdown(tables: list[dict], llm: dict | None, pool: dict | None) -> str:
    lines = ["# Routers on recorded outcomes", "",
             "Regenerate with `python -m evals.run_router_table`. Each router is fitted on the train "
             "split (options tuned on a validation split of train only) and scored on the test split; `defaults` is the "
             "same router with its constructor defaults, untuned. Cost = active parameters (billions) of the experts "
             "called per query; undisclosed API models cost 200 (evals/outcomes.py). k > 1 is a weighted vote: on MMLU-Pro "
             "replayed on the recorded answer letters, elsewhere the worst case (all wrong experts agree). APGR and CPT as "
             "RouteLLM defines them, over normalised cost between the cheapest expert (weak) and the single best (strong); "
             "CPT is the normalised cost (= call share to the strong model with two models) needed to recover 50% / 80% of "
             "the gap. `validation` is the tuned router's accuracy on the validation part of train. Rows marked "
             "`(dc encoder)` run the router over the dc router's fine-tuned encoder with the options tuned for it on the "
             "default embeddings. Latency is measured on MMLU-Pro on a shared 2-core CPU. `95% interval` is how far "
             "the gain over the single best could be the test split's luck: a paired percentile bootstrap "
             f"({BOOTSTRAP_RESAMPLES:,} resamples of the test questions, seeded); a gain whose interval holds 0 is "
             "not shown to be one.", ""]
    for table in tables:  # rows written before labels and validation existed
        for r in table["rows"]:
            r.setdefault("label", label_of(r["router"], r["k"], ""))
            r.setdefault("validation_accuracy", None)
            r.setdefault("vs_single_best_interval", None)
    by_name = {t["dataset"]: t for t in tables}
    lines += targets_section(by_name)
    for table in tables:
        b = table["baselines"]
        lines += [f"## {table['dataset']} ({table['experts']} models; {table['n_train']} train / {table['n_test']} test)", ""]
        lines += dataset_summary(table)
        lines += ["| router | k | accuracy | vs single best | 95% interval | defaults | validation | cost | APGR | CPT(50%) | CPT(80%) | route p50 ms (batch 1, with embedding) | ms/query (batch 64, no embedding) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in table["rows"]:
            lines.append(f"| {r.get('label', r['router'])} | {r['k']} | {fmt(r['accuracy'])} | {r['vs_single_best']:+.4f} | "
                         f"{interval_cell(r.get('vs_single_best_interval'))} | {fmt(r['default_options_accuracy'])} | "
                         f"{fmt(r.get('validation_accuracy'))} | {fmt(r['cost'], 1)} | {fmt(r['apgr'], 3)} | {fmt(r['cpt50'], 3)} | {fmt(r['cpt80'], 3)} | "
                         f"{fmt(r['route_ms_p50'], 1)} | {fmt(r['route_ms_p50_batch64_no_embedding'], 3)} |")
        lines += [f"| single best ({b['single_best']['model']}) | 1 | {fmt(b['single_best']['accuracy'])} | +0.0000 | | | | {fmt(b['single_best']['cost'], 1)} | | | | | |",
                  f"| oracle (upper bound) | 1 | {fmt(b['oracle']['accuracy'])} | {b['oracle']['accuracy'] - b['single_best']['accuracy']:+.4f} | | | | {fmt(b['oracle']['cost'], 1)} | | | | | |",
                  f"| random | 1 | {fmt(b['random']['accuracy'])} | {b['random']['accuracy'] - b['single_best']['accuracy']:+.4f} | | | | {fmt(b['random']['cost'], 1)} | | | | | |",
                  f"| cheapest ({b['weak']['model']}) | 1 | {fmt(b['weak']['accuracy'])} | {b['weak']['accuracy'] - b['single_best']['accuracy']:+.4f} | | | | {fmt(b['weak']['cost'], 1)} | | | | | |",
                  "", f"![{table['dataset']}]({table['dataset']}.png)", ""]
    lines += best_vs_knn(tables)
    lines += cascade_section(tables)
    lines += history_section(tables)
    if llm:
        lines += [f"## LLM extractors vs embeddings (MMLU-Pro test, {llm['sample']} questions evenly spread over the split)", "",
                  "SmolLM2-135M-Instruct writes the skills (Symbolic-MoE) or the task instruction (GLIDER) for each test "
                  "question: about 0.5 s per question and writer on this CPU (batches of 16), run once and cached in the coe "
                  "cache dir; `seconds` is the evaluation with the cache warm. Profiles, task embeddings and tuning use the "
                  "training questions either way (running the LLM over them is out of reach on a CPU). " + llm_prose(llm), "",
                  "| router | k | query side | accuracy | single best | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['router']} | {r['k']} | {r['source']} | {fmt(r['accuracy'])} | {fmt(r['best_single_accuracy'])} | {r['seconds']:.0f} |"
                  for r in llm["rows"]]
        lines.append("")
    if pool:
        lines += [f"## GLIDER on the embedded LoRA pool ({pool['questions']} held-out task questions)", "",
                  "Share routed to the expert trained on the question's task; local gates are logistic gates on "
                  "SmolLM2 hidden states (layer 10) of each expert's training questions.", "",
                  "| local weight | routed to own expert | per task | fit s | route s |", "|---|---|---|---|---|"]
        lines += [f"| {r['local_weight']} | {r['routed_to_own_expert']:.3f} | "
                  f"{', '.join(f'{t} {v:.2f}' for t, v in r['per_task'].items())} | {r['fit_seconds']:.0f} | {r['route_seconds']:.0f} |"
                  for r in pool["rows"]]
        lines.append("")
    lines += ["## Notes", ""]
    routellm = by_name.get("routellm")
    voted = [r for r in (routellm or {}).get("rows", []) if r["router"] == "symbolic" and r["k"] > 1]
    if voted and routellm["experts"] == 2:
        r = voted[0]
        lines.append(f"- With two models (RouteLLM) `symbolic` k = {r['k']} calls both (cost {r['cost']:.1f} against the "
                     f"single best's {routellm['baselines']['single_best']['cost']:.1f}), and the worst-case vote cannot "
                     f"overturn the better-ranked one: APGR {fmt(r['apgr'], 3)}.")
    if "llmrouter" in by_name:
        lines.append("- Without recorded answers (LLMRouter, RouteLLM) a vote of k > 1 experts is scored in the worst case "
                     "for voting, so its gain there is a lower bound.")
    lines += ["- Batch-1 latency is mostly the query embedding: all-MiniLM-L6-v2 (or the dc encoder, the same network "
              "fine-tuned) with int8 weights on ONNX Runtime, 2 threads of this 2-core CPU; the routers' own work is the "
              "batch-64 column.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=DATASETS, action="append")
    parser.add_argument("--llm-sample", type=int, default=300)
    parser.add_argument("--no-llm", action="store_true")
    parser.add_argument("--no-pool", action="store_true")
    parser.add_argument("--no-datasets", action="store_true", help="only the LLM and pool sections")
    parser.add_argument("--no-cascade", action="store_true", help="skip the adaptive-k evaluation")
    parser.add_argument("--no-history", action="store_true", help="skip the conversation evaluation")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    ran = [] if args.no_datasets else args.only or DATASETS
    for name in ran:
        summary[name] = run_dataset(name, cascades=not args.no_cascade, history=not args.no_history)
        summary_path.write_text(json.dumps(stamp(summary), indent=1))
    if not args.no_llm:
        summary["llm_extractors"] = run_llm_extractors(args.llm_sample)
        summary_path.write_text(json.dumps(stamp(summary), indent=1))
    if not args.no_pool:
        summary["pool_glider"] = run_pool_gates()
        summary_path.write_text(json.dumps(stamp(summary), indent=1))
    for name in DATASETS:  # data sets not rerun: their figures again from their JSON (same numbers)
        if name not in ran and (OUT / f"{name}.json").is_file() and name in summary:
            saved = [OfflineResult(summary=r, curve=r["curve"]) for r in json.loads((OUT / f"{name}.json").read_text())]
            plot_curves(saved, OUT / f"{name}.png", f"{name}: accuracy vs cost over the cost knob (test split)")
            if summary[name].get("cascade"):
                plot_cascades(summary[name]["cascade"], summary[name]["rows"], summary[name]["baselines"],
                              OUT / f"{name}_cascade.png", f"{name}: adaptive k (test split)")
    tables = [summary[name] for name in DATASETS if name in summary]
    (OUT / "table.md").write_text(markdown(tables, summary.get("llm_extractors"), summary.get("pool_glider")))


if __name__ == "__main__":
    main()
