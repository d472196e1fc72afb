"""The `coe` command line: ask, experts list / train, serve.

User errors (CoeError) print one line and exit 2, without a traceback. Heavy imports (torch,
Ray) happen inside the commands that need them, so `coe --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from core.errors import CoeError
from evals.cli import eval_app, router_app

app = typer.Typer(help="coe: route each question to the experts that are good at it.", no_args_is_help=True)
experts_app = typer.Typer(help="The expert catalog: list, check and train experts.", no_args_is_help=True)
app.add_typer(experts_app, name="experts")
app.add_typer(router_app, name="router")
app.add_typer(eval_app, name="eval")
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)  # one error, one line

ConfigOption = typer.Option(None, "--config", "-c", help="coe YAML config (default: the embedded default pool).")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question to answer."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Routing policy or concrete expert name."),
    max_tokens: int = typer.Option(256, help="Most tokens to generate."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: answer, experts, timings."),
    config: Optional[Path] = ConfigOption,
):
    """Answer one question through the router and show which experts answered."""
    from core.config import load_config
    from core.types import GenerationParams, Query
    from deploy.openai_api import describe
    from experts.backends import in_process_backend_name
    from orchestrator.pipeline import Pipeline

    settings = load_config(config)
    settings.backend.name = in_process_backend_name(settings.backend.name)
    query = Query.from_text(question, policy=policy, params=GenerationParams(max_tokens=max_tokens))
    with Pipeline.from_config(settings) as pipeline:  # its tasks end with it, not as "Task was destroyed" at exit
        result = pipeline.run([query])[0]
    if as_json:
        print(json.dumps(describe(result), indent=2))
        return
    console.print(result.text, markup=False, highlight=False)
    console.print()
    chosen = {s.expert for s in result.decision.chosen}
    routing = ", ".join(
        f"[bold]{s.expert}[/bold] {s.score:.2f}" if s.expert in chosen else f"{s.expert} {s.score:.2f}"
        for s in result.decision.ranked
    )
    console.print(f"[dim]policy[/dim] {result.decision.policy}  [dim]experts[/dim] {routing}")
    if result.decision.explanation:
        console.print("why: " + result.decision.explanation, markup=False, highlight=False, style="dim")
    timings = "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
    console.print(f"[dim]timings[/dim] {timings}  [dim]tokens[/dim] {result.usage.prompt_tokens}+{result.usage.completion_tokens}")


@app.command()
def route(
    questions: list[str] = typer.Argument(..., help="Questions to route."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Routing policy (default: the config's default_policy)."),
    as_json: bool = typer.Option(False, "--json", help="Print the decisions as JSON."),
    config: Optional[Path] = ConfigOption,
):
    """Route questions without answering them: ranked experts, scores and why (no model starts)."""
    from core.config import load_config
    from core.errors import unknown
    from orchestrator.policies import VIRTUAL_PREFIX, build_policies, policy_name

    settings = load_config(config)
    name = policy_name(policy, settings.policies, settings.default_policy)
    if name is None:
        raise unknown("policy", policy, [*settings.policies, *(VIRTUAL_PREFIX + p for p in settings.policies)])
    router = build_policies({name: settings.policies[name]}, settings.load_catalog())[name]
    decisions = router.route(questions, policy=name)
    if as_json:
        print(json.dumps([d.model_dump() | {"question": q} for q, d in zip(questions, decisions)], indent=2))
        return
    for question, decision in zip(questions, decisions):
        chosen = {s.expert for s in decision.chosen}
        ranking = ", ".join(f"[bold]{s.expert}[/bold] {s.score:.2f}" if s.expert in chosen else f"{s.expert} {s.score:.2f}"
                            for s in decision.ranked)
        console.print(question, markup=False, highlight=False)
        console.print(f"  [dim]policy[/dim] {decision.policy}  [dim]experts[/dim] {ranking}")
        console.print("  why: " + decision.explanation, markup=False, highlight=False, style="dim")


@experts_app.command("list")
def experts_list(
    config: Optional[Path] = ConfigOption,
    url: Optional[str] = typer.Option(None, "--url", help="A running coe server: also show where it holds each "
                                      "expert now (its /v1/pool; API key from COE_API_KEY)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Show the catalog: kind, base, size, tasks and where each expert resides."""
    from core.config import load_config
    from experts.backends import resolve_backend_name, runner_of
    from experts.weights import residence

    settings = load_config(config)
    catalog = settings.load_catalog()
    local = resolve_backend_name(settings.backend.name)  # the backend `coe serve` runs local models on
    live = _live_residence(url) if url else {}
    rows = []
    for e in catalog.experts:
        resides, detail = residence(catalog, e)
        rows.append({
            "name": e.name, "kind": e.kind, "base": e.base, "params": e.params, "size_bytes": e.size_bytes,
            "tasks": e.tasks, "resides": resides, "detail": detail,
            "default": e.name == catalog.default_expert, "backend": runner_of(e, local),
        } | ({"served": live.get(e.name, [])} if url else {}))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    caption = ("served: the tier each server replica holds it in" if url
               else "resides: where the weights are now; --url URL shows where a running server holds them")
    table = Table(title="coe experts", caption=caption)
    columns = ["name", "kind", "base", "params", "size", "tasks", "backend", "resides"] + (["served"] if url else []) + ["detail"]
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column in ("name", "base", "resides"))
    for r in rows:
        served = [", ".join(f"{s['tier']} ({s['where']})" for s in r["served"]) or "disk"] if url else []
        table.add_row(
            r["name"] + (" (default)" if r["default"] else ""), r["kind"], r["base"],
            f"{r['params'] / 1e6:.1f}M" if r["params"] else "-", _human_bytes(r["size_bytes"]) if r["size_bytes"] else "-",
            ", ".join(r["tasks"]), r["backend"], r["resides"], *served, r["detail"],
        )
    console.print(table)


@experts_app.command("check")
def experts_check(
    config: Optional[Path] = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON row per expert."),
):
    """Check every expert: its weights resolve (local models, adapters) or its endpoint answers and
    serves its model (remote experts: one cheap call listing the endpoint's models). Also shows each
    expert's context length and prices. Exits 1 when an expert that is not optional fails."""
    from core.config import load_config
    from experts.backends import resolve_backend_name, runner_of
    from experts.backends.remote import RemoteBackend
    from experts.weights import context_length, residence, weights_problem

    settings = load_config(config)
    catalog = settings.load_catalog()
    local = resolve_backend_name(settings.backend.name)
    problems = {e.name: weights_problem(catalog, e) for e in catalog.experts}
    remote = [e.name for e in catalog.experts if e.is_remote and problems[e.name] is None]
    answers = {}
    if remote:
        backend = RemoteBackend(catalog.subset(remote))
        try:
            answers = backend.check(remote)
        finally:
            backend.close()
    rows = []
    for e in catalog.experts:
        answer = answers.get(e.name)
        problem = problems[e.name] or (str(answer) if isinstance(answer, Exception) else None)
        detail = problem or (answer if isinstance(answer, str) else residence(catalog, e)[1])
        prices = e.prices.model_dump() if e.prices else None
        rows.append({"name": e.name, "kind": e.kind, "source": e.weights.source, "backend": runner_of(e, local),
                     "ok": problem is None, "optional": e.optional, "detail": detail,
                     "context_length": context_length(catalog, e),
                     "prices": prices and prices | {"derived": "prices" in e.derived}})
    failed = [r["name"] for r in rows if not r["ok"] and not r["optional"]]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        table = Table(title="coe experts check", caption="prices: dollars per million input / output tokens "
                      "(* derived from active parameters, see core/costs.py)")
        for column in ("name", "kind", "source", "backend", "status", "context", "prices", "detail"):
            table.add_column(column, overflow="fold", no_wrap=column in ("name", "status"))
        for r in rows:
            status = "[green]ok[/green]" if r["ok"] else ("[yellow]unavailable[/yellow] (optional)" if r["optional"]
                                                          else "[red]FAIL[/red]")
            prices = (f"{r['prices']['input']:.4g} / {r['prices']['output']:.4g}" + ("*" if r["prices"]["derived"] else "")
                      if r["prices"] else "-")
            table.add_row(r["name"], r["kind"], r["source"], r["backend"], status, str(r["context_length"]), prices,
                          Text(r["detail"]))
        console.print(table)
    if failed:
        raise typer.Exit(1)


def _live_residence(url: str) -> dict[str, list[dict]]:
    """Expert -> [{where, tier}] from a running server's GET /v1/pool."""
    import httpx

    key = os.environ.get("COE_API_KEY")
    try:
        reply = httpx.get(url.rstrip("/") + "/v1/pool", headers={"authorization": f"Bearer {key}"} if key else {},
                          timeout=30)
    except httpx.HTTPError as exc:
        raise CoeError(f"cannot reach the coe server at {url} ({type(exc).__name__})",
                       "start it with `coe serve` or check --url") from None
    if reply.status_code != 200:
        raise CoeError(f"the coe server at {url} answered /v1/pool with HTTP {reply.status_code}",
                       "set COE_API_KEY if it needs a key" if reply.status_code == 401 else "check --url")
    served: dict[str, list[dict]] = {}
    for report in reply.json()["data"]:
        for expert, tier in report["residence"].items():
            served.setdefault(expert, []).append({"where": report["where"], "tier": tier})
    return served


@experts_app.command("train")
def experts_train(
    only: Optional[list[str]] = typer.Option(None, "--only", help="Train only these experts (repeatable)."),
    steps: Optional[int] = typer.Option(None, help="Override the configured number of steps (for quick tries)."),
    batch_size: Optional[int] = typer.Option(None, min=1,
                                             help="Override the configured batch size (less memory, quicker steps)."),
    out: Optional[Path] = typer.Option(None, help="Write adapters here instead of experts/adapters/."),
):
    """Train the LoRA experts of experts/adapters/train_config.yaml with peft."""
    from core.catalog import ADAPTERS_ROOT, load_catalog
    from experts.training import load_train_config, train_expert

    config = load_train_config()
    catalog = load_catalog()
    for name in only or list(config.experts):
        if name in config.experts:
            run = config.experts[name].run
            if steps is not None:
                run.steps = steps
            if batch_size is not None:
                run.batch_size = batch_size
        log = train_expert(name, config, catalog, out_root=out or ADAPTERS_ROOT)
        console.print_json(json.dumps(log))


@app.command()
def serve(
    config: Optional[Path] = ConfigOption,
    host: Optional[str] = typer.Option(None, help="Address to listen on (default: config serve.host, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port to listen on (default: config serve.port, 8000)."),
):
    """Serve the OpenAI-compatible router API on Ray Serve (blocks until Ctrl-C)."""
    from core.config import load_config
    from deploy.app import run_forever

    settings = load_config(config)
    run_forever(settings, host=host or settings.serve.host, port=port or settings.serve.port)


def main() -> None:
    # A question deserves an answer, not weight-loading progress bars and library warnings.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(code) comes back as its code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except CoeError as exc:
        err_console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors come here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
