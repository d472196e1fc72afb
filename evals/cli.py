"""`coe router fit|calibrate` and `coe eval offline`: routers on recorded outcome data.

Data sets are names (`mmlu_pro:train`, `llmrouter:test`, `routellm:test`, see evals.outcomes) or
paths to outcome .jsonl files in one of three formats (routers/outcome_files.py); `coe router fit
--from-feedback` fits on the scored responses of the feedback store (orchestrator/feedback.py).
Imports stay light here: numpy, faiss and torch load inside commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

router_app = typer.Typer(help="Fit, calibrate and save routers on outcome data.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate routers.", no_args_is_help=True)

RouterOption = typer.Option(..., "--router", "-r", help="Router name: knn, coe, symbolic, glider, cluster, mf, dc, best, random, single_best, oracle.")
KOption = typer.Option(None, "--k", help="Experts per query (k > 1: weighted vote).")
TuneOption = typer.Option(True, "--tune/--no-tune", help="Tune options on a validation split of the training data.")
OptionsOption = typer.Option(None, "--option", "-o", help="Router option KEY=VALUE (YAML value), repeatable.")
CostsOption = typer.Option(None, "--costs", help="JSON {model: cost} overriding the default costs (active params, B).")


def parse_options(pairs: list[str] | None) -> dict:
    import yaml

    from core.errors import CoeError

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CoeError(f"router option {pair!r} is not KEY=VALUE", "for example: --option neighbours=50")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _cost_overrides(costs: Optional[Path]) -> dict | None:
    from core.errors import CoeError

    if costs is None:
        return None
    if not costs.is_file():
        raise CoeError(f"cost table {costs} does not exist", "pass a JSON file {model: cost}")
    return json.loads(costs.read_text())


def _load(data: str, costs: Optional[Path], known_experts=None):
    from evals.outcomes import load_outcomes

    return load_outcomes(data, _cost_overrides(costs), known_experts)


def _calibrate(router, texts: list[str], share: float, vectors) -> dict:
    """Calibrate the cost knob; warn where the target share cannot be had."""
    router.calibrate(texts, share, vectors)
    calibration = router.calibration
    costs = router.cost_vector()
    tolerance = 0.5 / max(calibration.queries, 1)
    if costs.size and (costs == costs.max()).all():
        typer.echo("warning: every expert costs the same, so the cost knob has nothing to trade and every call goes to "
                   "the 'most expensive' expert; give costs with --costs {model: cost}", err=True)
    elif share > calibration.max_share + tolerance:
        typer.echo(f"warning: target share {share:g} is unreachable: this router sends at most {calibration.max_share:.3f} "
                   f"of these queries to {', '.join(calibration.most_expensive)} (at cost threshold 0, where it is set)",
                   err=True)
    return {"cost_threshold": calibration.cost_threshold, "target_share": share, "achieved_share": calibration.achieved_share,
            "max_share": calibration.max_share, "reachable": share <= calibration.max_share + tolerance,
            "most_expensive": calibration.most_expensive}


def _known_router(name: str) -> None:
    from core.errors import unknown
    from routers import ROUTERS

    if name not in ROUTERS:
        raise unknown("router", name, ROUTERS)


FIT_HELP = """Fit a router on outcome data and save it as a versioned router folder (router.json, arrays.npz,
manifest.json), which a policy serves with `policies: {NAME: {router_path: DIR}}`.

--data takes a data set name (mmlu_pro:train, llmrouter:train, routellm, with :train or :test) or a
JSON Lines file (FILE.jsonl, FILE.jsonl:train) in one of three formats, detected per file:

outcomes, one row per query: {"id": "q1", "question": "...", "outcomes": {"expert-a": 1, "expert-b": 0.4},
"category": "math"}; "category" is optional, "choices" (a list) joins the routing text; an expert of the
file missing from a row failed it (0).

scores, one row per (query, expert, score): {"query": "...", "expert": "expert-a", "score": 0.8,
"id": "q1", "category": "math"}; "id" and "category" are optional; scores of one expert on one query
are averaged; an expert with no row for a query is unmeasured there.

pairwise, RouteLLM's preferences: {"query": "...", "winner": "expert-a", "loser": "expert-b"},
optional "tie": true (0.5 each), "id", "category"; each comparison gives the winner 1 and the loser 0,
and an expert's score on a query is its mean over the comparisons it took part in.

Scores lie in [0, 1]. A malformed line, an unknown field, or an expert --catalog lacks fails with
one message naming the file and the line. --from-feedback fits on the scored responses of the
feedback store instead (each response's answering experts get its score)."""
FIT_HELP = "\n\n".join(paragraph.replace("\n", " ") for paragraph in FIT_HELP.split("\n\n"))  # help rewraps them


@router_app.command("fit", help=FIT_HELP)
def router_fit(
    router: str = RouterOption,
    out: Path = typer.Option(..., "--out", help="Router folder to write (created; files in it are replaced)."),
    data: Optional[str] = typer.Option(None, "--data", help="Training outcomes: a data set name or a .jsonl outcome file."),
    from_feedback: bool = typer.Option(False, "--from-feedback", help="Fit on the feedback store's scored responses."),
    since: Optional[str] = typer.Option(None, "--since", help="With --from-feedback: responses since then (7d, 12h or a date)."),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="Refuse experts this catalog lacks (default with --config: its catalog)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="coe config: its catalog, and its feedback store."),
    k: Optional[int] = KOption,
    tune: bool = TuneOption,
    calibrate_share: Optional[float] = typer.Option(None, "--calibrate-share",
                                                    help="Set the cost knob so this share of calls goes to the most expensive expert."),
    options: Optional[list[str]] = OptionsOption,
    costs: Optional[Path] = CostsOption,
):
    from core.catalog import load_catalog
    from core.config import load_config
    from core.errors import CoeError
    from evals.router_eval import TUNING_GRIDS, embeddings_for, make_router
    from evals.router_eval import tune as tune_options

    _known_router(router)
    if (data is None) == (not from_feedback):
        raise CoeError("give one source of outcomes", "--data FILE.jsonl (or a data set name) or --from-feedback")
    if since is not None and not from_feedback:
        raise CoeError("--since filters the feedback store", "use it with --from-feedback")
    settings = load_config(config) if config is not None else None
    known = None
    if catalog is not None or settings is not None:
        known = load_catalog(catalog or settings.catalog).names
    chosen = parse_options(options)
    if k is not None:
        chosen["k"] = k
    if from_feedback:
        train, vectors, source = _feedback_outcomes(settings, since, costs, known)
    else:
        train = _load(data, costs, known)
        vectors, source = embeddings_for(train, progress=True), data
    if tune and router in TUNING_GRIDS:
        chosen, _ = tune_options(router, chosen, train, vectors)
    fitted = make_router(router, chosen, train.cost_table).fit(train.data, vectors)
    calibration = {}
    if calibrate_share is not None:
        calibration = _calibrate(fitted, train.data.texts, calibrate_share, vectors)
    fitted.fitted_on.source = source
    fitted.fitted_on.format = "+".join(train.formats) or None
    manifest = fitted.save(out)
    shown = {key: value for key, value in chosen.items() if key != "embed"}
    typer.echo(json.dumps({"router": router, "options": shown, "cost_threshold": fitted.cost_threshold, **calibration,
                           "experts": len(fitted.experts), "rows": len(train.data.texts), "data": manifest.data.model_dump(),
                           "embedder": manifest.embedder, "saved": str(out)}))


def _feedback_outcomes(settings, since: Optional[str], costs: Optional[Path], known):
    """The feedback store's scored responses as an outcome set, their vectors, and a source line."""
    import numpy as np

    from core.config import FeedbackConfig
    from core.errors import CoeError
    from evals.outcomes import OutcomeSet, model_costs
    from evals.router_eval import embeddings_for
    from orchestrator.feedback import FeedbackStore, parse_since

    store = FeedbackStore.from_config(settings.feedback if settings is not None else FeedbackConfig())
    try:
        feedback = store.outcomes(parse_since(since))
    finally:
        store.close()
    unknown = [e for e in feedback.data.experts if known is not None and e not in known]
    if unknown:
        raise CoeError(f"the feedback store {store.path} credits experts the catalog lacks: {', '.join(unknown)}",
                       "fit with the catalog those responses were served from, or without --catalog")
    if feedback.skipped:
        typer.echo(f"note: {feedback.skipped} scored responses kept only embeddings of another embedder and are left out", err=True)
    data = feedback.data
    train = OutcomeSet(name="feedback", data=data, costs=model_costs(data.experts, None, _cost_overrides(costs)),
                       formats=("feedback",))
    vectors = feedback.embeddings if feedback.embeddings is not None else embeddings_for(train, progress=True)
    return train, np.asarray(vectors, dtype=np.float32), f"feedback {store.path}" + (f" since {since}" if since else "")


@router_app.command("calibrate")
def router_calibrate(
    directory: Path = typer.Argument(..., help="A saved router (from `coe router fit`)."),
    data: str = typer.Option(..., "--data", help="Queries to calibrate on: a data set name or .jsonl path."),
    share: float = typer.Option(..., "--share", help="Target share of calls to the most expensive expert, 0..1."),
):
    """Set a saved router's cost threshold so `share` of the calls go to the most expensive expert
    (warns where no threshold gives that many: the most it sends there is at threshold 0)."""
    from evals.router_eval import embeddings_for
    from routers import load_router

    router = load_router(directory)
    queries = _load(data, None)
    calibration = _calibrate(router, queries.data.texts, share, embeddings_for(queries, progress=True))
    router.save(directory)
    typer.echo(json.dumps({**calibration, "saved": str(directory)}))


@eval_app.command("offline")
def eval_offline(
    router: str = RouterOption,
    train: str = typer.Option(..., "--train", help="Fitting outcomes, e.g. mmlu_pro:train or a .jsonl path."),
    test: str = typer.Option(..., "--test", help="Test outcomes, e.g. mmlu_pro:test or a .jsonl path."),
    k: Optional[int] = KOption,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary, curve and tuning trials here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the cost-quality curve as PNG here."),
    tune: bool = TuneOption,
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N test queries (bounded runs)."),
    extractor: Optional[str] = typer.Option(None, "--extractor", help="How test queries are read: symbolic skills (embedding, llm) or glider instructions (query, llm)."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure routing latency."),
    options: Optional[list[str]] = OptionsOption,
    costs: Optional[Path] = CostsOption,
):
    """Fit on train, score on test: accuracy, cost, baselines, cost-quality curve (APGR, CPT), latency."""
    from evals.router_eval import evaluate_offline, plot_curves

    _known_router(router)
    train_set, test_set = _load(train, costs), _load(test, costs)
    if limit is not None:
        test_set = test_set.take(range(min(limit, len(test_set.data.texts))))
    result = evaluate_offline(router, train_set, test_set, k=k, options=parse_options(options), tune_options=tune,
                              latency=latency, progress=True, extractor=extractor)
    print_summary(result.summary)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.as_json(), indent=2))
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_curves([result], plot, f"{router} on {test}")


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['router']} (k={summary['k']}) fitted on {summary['train']}, tested on {summary['test']}")
    for column in ("", "accuracy", "cost"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row(summary["router"], f"{summary['accuracy']:.4f}", f"{summary['cost']:.1f}")
    table.add_row(f"single best ({summary['best_single']})", f"{summary['best_single_accuracy']:.4f}", f"{summary['best_single_cost']:.1f}")
    table.add_row("oracle (upper bound)", f"{summary['oracle_accuracy']:.4f}", f"{summary['oracle_cost']:.1f}")
    table.add_row("random", f"{summary['random_accuracy']:.4f}", f"{summary['random_cost']:.1f}")
    Console().print(table)

    def cpt(value):
        return "not reached" if value is None else f"{value:.1%}"

    latency = (f"route p50 {summary['route_ms_p50']:.2f} ms (batch 1, with embedding), "
               f"{summary['route_ms_p50_batch64_no_embedding']:.3f} ms/query (batch 64, without)") if "route_ms_p50" in summary else ""
    typer.echo(f"APGR {summary['apgr']:.3f}  CPT(50%) {cpt(summary['cpt50'])}  CPT(80%) {cpt(summary['cpt80'])}  "
               f"options {json.dumps(summary['options'])}  {latency}")


@eval_app.command("run")
def eval_run(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help="mmlu, mmlu_pro, gsm8k, arc_challenge, medmcqa, math500, bbh, mt_bench."),
    policy: str = typer.Option("coe", "--policy", "-p", help="Routing policy or concrete expert (as `coe ask --policy`, or the model over HTTP)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="A sample of N items spread over the set (a larger N extends a smaller one)."),
    via: Optional[str] = typer.Option(None, "--via", help="Base URL of a running `coe serve` (e.g. http://127.0.0.1:8000/v1); default: in-process."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/BENCHMARK-POLICY). Re-running resumes it."),
    batch_size: int = typer.Option(16, "--batch-size", help="Items per pipeline batch (concurrent requests with --via)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Override the benchmark's answer length."),
    judge: Optional[str] = typer.Option(None, "--judge", help="MT-Bench: policy or expert that rates the answers (off by default)."),
    judge_max_tokens: int = typer.Option(256, "--judge-max-tokens", help="MT-Bench: the judge's room for its reasoning and rating."),
    replay: Optional[str] = typer.Option(None, "--replay", help="Replay experts of an outcome data set (mmlu_pro) on its test split."),
    include_fitted: bool = typer.Option(False, "--include-fitted", help="Keep items the embedded experts or routers were fitted on."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="coe YAML config for an in-process run."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Run a benchmark through the pipeline (or a server) and report accuracy, tokens, time and experts."""
    from evals.report import REPORT_FILE
    from evals.runner import RunConfig, run_benchmark

    run_config = RunConfig(benchmark=benchmark, policy=policy, via=via, replay=replay, config=str(config) if config else None,
                           limit=limit, batch_size=batch_size, max_tokens=max_tokens, judge=judge,
                           judge_max_tokens=judge_max_tokens, include_fitted=include_fitted)
    directory = out or Path("runs") / f"{benchmark}-{policy}".replace("/", "-")
    summary = run_benchmark(run_config, directory)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    accuracy = "—" if summary["accuracy"] is None else f"{summary['accuracy']:.4f}"
    typer.echo(f"{summary['benchmark']} / {summary['policy']}: accuracy {accuracy} on {summary['scored']} of {summary['items']} items, "
               f"{summary['tokens']['completion']} completion tokens, wall {summary['wall_seconds']:.1f} s, "
               f"load {summary['load_seconds']:.2f} s{' (simulated)' if summary['load_seconds_simulated'] else ''}; "
               f"report {directory / REPORT_FILE}")


@eval_app.command("compare")
def eval_compare(
    directories: list[Path] = typer.Argument(..., help="Run directories written by coe eval run."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write compare.md, compare.json and plots here."),
):
    """Several runs side by side: accuracy, cost, tokens and time, and accuracy per category."""
    from evals.report import compare

    _, table = compare(directories, out)
    typer.echo(table)
