"""`coe router fit|calibrate` and `coe eval offline`: routers on recorded outcome data.

Data sets are names (`mmlu_pro:train`, `llmrouter:test`, `routellm:test`, see evals.outcomes) or
paths to outcome .jsonl files. Imports stay light here: numpy, faiss and torch load inside commands.
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


def _load(data: str, costs: Optional[Path]):
    from core.errors import CoeError
    from evals.outcomes import load_outcomes

    overrides = None
    if costs is not None:
        if not costs.is_file():
            raise CoeError(f"cost table {costs} does not exist", "pass a JSON file {model: cost}")
        overrides = json.loads(costs.read_text())
    return load_outcomes(data, overrides)


def _known_router(name: str) -> None:
    from core.errors import unknown
    from routers import ROUTERS

    if name not in ROUTERS:
        raise unknown("router", name, ROUTERS)


@router_app.command("fit")
def router_fit(
    router: str = RouterOption,
    data: str = typer.Option(..., "--data", help="Training outcomes: a data set name or .jsonl path."),
    out: Path = typer.Option(..., "--out", help="Directory to save the fitted router to."),
    k: Optional[int] = KOption,
    tune: bool = TuneOption,
    calibrate_share: Optional[float] = typer.Option(None, "--calibrate-share",
                                                    help="Set the cost knob so this share of calls goes to the most expensive expert."),
    options: Optional[list[str]] = OptionsOption,
    costs: Optional[Path] = CostsOption,
):
    """Fit a router on outcome data and save it (router.json + arrays.npz)."""
    from evals.router_eval import TUNING_GRIDS, embeddings_for, make_router
    from evals.router_eval import tune as tune_options

    _known_router(router)
    train = _load(data, costs)
    chosen = parse_options(options)
    if k is not None:
        chosen["k"] = k
    vectors = embeddings_for(train, progress=True)
    if tune and router in TUNING_GRIDS:
        chosen, _ = tune_options(router, chosen, train, vectors)
    fitted = make_router(router, chosen, train.cost_table).fit(train.data, vectors)
    calibration = {}
    if calibrate_share is not None:
        _, achieved = fitted.calibrate(train.data.texts, calibrate_share, vectors)
        calibration = {"target_share": calibrate_share, "achieved_share": achieved}
    fitted.save(out)
    shown = {key: value for key, value in chosen.items() if key != "embed"}
    typer.echo(json.dumps({"router": router, "options": shown, "cost_threshold": fitted.cost_threshold, **calibration,
                           "experts": len(fitted.experts), "saved": str(out)}))


@router_app.command("calibrate")
def router_calibrate(
    directory: Path = typer.Argument(..., help="A saved router (from `coe router fit`)."),
    data: str = typer.Option(..., "--data", help="Queries to calibrate on: a data set name or .jsonl path."),
    share: float = typer.Option(..., "--share", help="Target share of calls to the most expensive expert, 0..1."),
):
    """Set a saved router's cost threshold so `share` of the calls go to the most expensive expert."""
    from evals.router_eval import embeddings_for
    from routers import load_router

    router = load_router(directory)
    queries = _load(data, None)
    threshold, achieved = router.calibrate(queries.data.texts, share, embeddings_for(queries, progress=True))
    router.save(directory)
    typer.echo(json.dumps({"cost_threshold": threshold, "target_share": share, "achieved_share": achieved,
                           "most_expensive": [e for e, c in router.costs.items() if c >= max(router.costs.values())],
                           "saved": str(directory)}))


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
    replay: Optional[str] = typer.Option(None, "--replay", help="Replay experts of an outcome data set (mmlu_pro) on its test split."),
    include_fitted: bool = typer.Option(False, "--include-fitted", help="Keep items the embedded experts or routers were fitted on."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="coe YAML config for an in-process run."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Run a benchmark through the pipeline (or a server) and report accuracy, tokens, time and experts."""
    from evals.report import REPORT_FILE
    from evals.runner import RunConfig, run_benchmark

    run_config = RunConfig(benchmark=benchmark, policy=policy, via=via, replay=replay, config=str(config) if config else None,
                           limit=limit, batch_size=batch_size, max_tokens=max_tokens, judge=judge, include_fitted=include_fitted)
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
