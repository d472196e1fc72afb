"""Benchmark runs: a benchmark's items through the real pipeline (in-process) or a running `coe
serve` (over HTTP, with the openai client), scored as they finish and appended to a JSONL file.

A run directory holds `run.json` (what was asked), `results.jsonl` (one record per finished item,
appended and flushed batch by batch) and, at the end, the report (evals.report). Starting the
same run again reads the records back and answers only the items that have none: an interrupted
run, even a killed one, resumes where it stopped, with nothing lost or answered twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from core.data import Item
from core.errors import CoeError
from core.prompts import eval_prompt, judge_prompt
from core.types import GenerationParams, Message, Query
from evals.benchmarks import Benchmark, benchmark_items, get_benchmark
from evals.provenance import stamp
from evals.report import summarize, write_report
from evals.scoring import score
from evals.store import RESULTS_FILE, RUN_FILE, ResultStore, RunConfig

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


class Answered(BaseModel):
    """One query's answer as a target returns it, with its share of the batch's seconds."""

    text: str
    experts: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    load_seconds: float = 0.0  # the query's share of its batch's expert loading (tier moves; simulated by replay)
    load_wait_seconds: float = 0.0  # ... of the time its batch stalled waiting for loads (the rest overlapped compute)
    generate_seconds: float = 0.0


class Target(Protocol):
    """Where queries are answered: the in-process pipeline or a server."""

    backend: str  # what answers (hf, replay, http), for the report

    def answer(self, queries: list[Query]) -> list[Answered]: ...

    def active_params(self, experts: list[str]) -> float | None:
        """Parameters active per token for these experts together (None: unknown)."""
        ...


class PipelineTarget:
    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.backend = pipeline.backend.name

    def answer(self, queries: list[Query]) -> list[Answered]:
        results = self.pipeline.run(queries)
        share = 1.0 / max(1, len(results))  # timings are the batch's
        return [
            Answered(text=r.text, experts=r.experts, prompt_tokens=r.usage.prompt_tokens,
                     completion_tokens=r.usage.completion_tokens, finish_reason=r.finish_reason,
                     load_seconds=r.timings.get("load_transfer", r.timings.get("load", 0.0)) * share,
                     load_wait_seconds=r.timings.get("load", 0.0) * share, generate_seconds=r.timings.get("generate", 0.0) * share)
            for r in results
        ]

    def active_params(self, experts: list[str]) -> float | None:
        """Each call runs its expert's whole model: a LoRA expert's base and adapter parameters
        (None where an expert's parameters are unknown, e.g. a remote one without `params`)."""
        catalog = self.pipeline.catalog
        counts = [catalog.active_params(catalog.get(e)) for e in experts]
        return None if None in counts else float(sum(counts))


class HttpTarget:
    """A running `coe serve` through the openai client; a batch goes out as concurrent requests
    (the server batches what arrives together)."""

    backend = "http"

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        import os

        from openai import OpenAI

        base_url = base_url.rstrip("/")
        base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"  # `coe serve` prints the URL without it
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("COE_API_KEY", "unused"),
                             timeout=timeout, max_retries=2)

    def _one(self, query: Query) -> Answered:
        p = query.params
        reply = self.client.chat.completions.create(
            model=query.policy or "coe", messages=[m.wire() for m in query.messages], max_tokens=p.max_tokens,
            temperature=p.temperature, **({"stop": p.stop} if p.stop else {}),
        )
        details = (reply.model_extra or {}).get("coe", {})
        timings = details.get("timings", {})
        return Answered(
            text=reply.choices[0].message.content or "",
            experts=[e["name"] for e in details.get("experts", []) if e.get("chosen")],
            prompt_tokens=reply.usage.prompt_tokens if reply.usage else 0,
            completion_tokens=reply.usage.completion_tokens if reply.usage else 0,
            finish_reason=reply.choices[0].finish_reason or "stop",
            load_seconds=timings.get("load_transfer", timings.get("load", 0.0)), load_wait_seconds=timings.get("load", 0.0),
            generate_seconds=timings.get("generate", 0.0),
        )

    def answer(self, queries: list[Query]) -> list[Answered]:
        with ThreadPoolExecutor(max_workers=len(queries)) as pool:
            return list(pool.map(self._one, queries))

    def active_params(self, experts: list[str]) -> float | None:
        return None


def batched(items: list, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def parse_rating(text: str) -> float | None:
    found = _RATING.findall(text)
    return float(found[-1]) if found else None


class Runner:
    def __init__(self, config: RunConfig, target: Target, out: Path):
        self.config = config
        self.target = target
        self.out = out
        self.benchmark: Benchmark = get_benchmark(config.benchmark)
        self.store = ResultStore(out / RESULTS_FILE)

    @property
    def params(self) -> GenerationParams:
        return GenerationParams(max_tokens=self.config.max_tokens or self.benchmark.max_tokens)

    def items(self, only_ids: set[str] | None = None) -> list[Item]:
        items = benchmark_items(self.benchmark, self.config.include_fitted)
        if only_ids is not None:
            items = [i for i in items if i.id in only_ids]
        if self.config.limit:
            # A sample spread over the whole set (files are ordered by category): the items first in
            # a stable hash order, so a larger limit extends a smaller one.
            items = sorted(items, key=lambda i: hashlib.sha256(i.id.encode()).digest())[: self.config.limit]
        return items

    def _check_same_run(self) -> None:
        path = self.out / RUN_FILE
        if path.is_file():
            before = RunConfig.model_validate(json.loads(path.read_text()))
            if before.identity() != self.config.identity():
                changed = {k: (before.identity()[k], v) for k, v in self.config.identity().items() if before.identity()[k] != v}
                raise CoeError(f"{self.out} holds a different run ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())})",
                               "use another --out directory, or delete this one to start over")
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(self.config.model_dump_json(indent=2))

    def run(self, items: list[Item], progress: bool = True) -> list[dict]:
        """Answer every item that has no record yet; returns the records of `items`, in item order."""
        from tqdm import tqdm

        self._check_same_run()
        done = self.store.load()
        wanted = {i.id for i in items}
        finished = [r for r in done.values() if r["id"] in wanted]
        todo = [i for i in items if i.id not in done]
        scored = [r["correct"] for r in finished if r["correct"] is not None]
        bar = tqdm(total=len(items), initial=len(finished), unit="item", disable=not progress,
                   desc=f"{self.benchmark.name} / {self.config.policy}")
        if scored:
            bar.set_postfix(accuracy=f"{sum(scored) / len(scored):.3f}")
        for batch in batched(todo, self.config.batch_size):
            records = self.answer_batch(batch)
            self.store.append(records)
            done.update({r["id"]: r for r in records})
            scored += [r["correct"] for r in records if r["correct"] is not None]
            bar.update(len(records))
            if scored:
                bar.set_postfix(accuracy=f"{sum(scored) / len(scored):.3f}")
        bar.close()
        return [done[i.id] for i in items]

    # -- one batch ---------------------------------------------------------------------------

    def _query(self, item: Item, messages: list[Message], policy: str | None = None, params=None) -> Query:
        return Query(id=item.id, messages=messages, params=params or self.params, policy=policy or self.config.policy)

    def answer_batch(self, batch: list[Item]) -> list[dict]:
        started = time.perf_counter()
        kind = self.benchmark.kind
        turns = [item.turns if kind == "judge" and item.turns else [eval_prompt(item, kind)] for item in batch]
        histories: list[list[Message]] = [[] for _ in batch]
        answers: list[list[Answered]] = [[] for _ in batch]
        for t in range(max(len(ts) for ts in turns)):
            rows = [i for i, ts in enumerate(turns) if t < len(ts)]
            for i in rows:
                histories[i].append(Message(role="user", content=turns[i][t]))
            replies = self.target.answer([self._query(batch[i], list(histories[i])) for i in rows])
            for i, reply in zip(rows, replies):
                histories[i].append(Message(role="assistant", content=reply.text))
                answers[i].append(reply)
        ratings = self._judge(batch, turns, answers) if kind == "judge" and self.config.judge else None
        wall_share = (time.perf_counter() - started) / len(batch)
        records = []
        for i, item in enumerate(batch):
            replies = answers[i]
            scored = score(item, replies[-1].text, kind)
            experts = [e for reply in replies for e in reply.experts]
            active = [self.target.active_params(reply.experts) for reply in replies]
            record = {
                "id": item.id, "category": item.category, "kind": kind, "gold": item.answer if kind != "judge" else None,
                "predicted": scored.predicted, "correct": scored.correct, "text": replies[-1].text,
                "experts": experts, "prompt_tokens": sum(r.prompt_tokens for r in replies),
                "completion_tokens": sum(r.completion_tokens for r in replies),
                "finish_reason": replies[-1].finish_reason,
                "active_params": None if None in active else sum(active) / len(active),
                "load_seconds": sum(r.load_seconds for r in replies), "load_wait_seconds": sum(r.load_wait_seconds for r in replies),
                "generate_seconds": sum(r.generate_seconds for r in replies),
                "wall_seconds": wall_share,
            }
            if kind == "judge":
                record["answers"] = [r.text for r in replies]
                record["judge"] = self.config.judge
                record["judge_ratings"] = ratings[i] if ratings else None
            records.append(record)
        return records

    def _judge(self, batch: list[Item], turns: list[list[str]], answers: list[list[Answered]]) -> list[list[float | None]]:
        """The judge rates each turn's answer; ratings are 1-10, None where it gave none."""
        prompts, where = [], []
        for i, item in enumerate(batch):
            for t, (question, reply) in enumerate(zip(turns[i], answers[i])):
                reference = item.reference[t] if item.reference and t < len(item.reference) else None
                prompts.append(self._query(item, [Message(role="user", content=judge_prompt(question, reply.text, reference))],
                                           policy=self.config.judge, params=GenerationParams(max_tokens=self.config.judge_max_tokens)))
                where.append(i)
        for n, q in enumerate(prompts):  # one batch may hold both turns of an item: ids must differ
            q.id = f"{q.id}#judge{n}"
        ratings: list[list[float | None]] = [[] for _ in batch]
        for i, reply in zip(where, self.target.answer(prompts)):
            ratings[i].append(parse_rating(reply.text))
        return ratings


def build_target(config: RunConfig):
    """The target a run config names, and the ids it can answer (None: every item)."""
    if config.via:
        if config.replay:
            raise CoeError("--via and --replay exclude each other", "replay runs in-process: drop --via")
        return HttpTarget(config.via), None
    if config.replay:
        from evals.replay import replay_pipeline

        pipeline, test_ids = replay_pipeline(config.replay, [config.policy], default_policy=config.policy)
        return PipelineTarget(pipeline), test_ids
    from core.config import load_config
    from experts.backends import in_process_backend_name
    from orchestrator.pipeline import Pipeline

    settings = load_config(config.config)
    settings.backend.name = in_process_backend_name(settings.backend.name)
    return PipelineTarget(Pipeline.from_config(settings)), None


def run_benchmark(config: RunConfig, out: Path, target: Target | None = None, only_ids: set[str] | None = None,
                  progress: bool = True) -> dict:
    """Run (or resume) one benchmark run and write its report; returns the summary."""
    owned = target is None
    if owned:
        target, only_ids = build_target(config)
    config = config.model_copy(update={"backend": target.backend})
    runner = Runner(config, target, out)
    try:
        items = runner.items(only_ids)
        if not items:
            raise CoeError(f"no items to run for {config.benchmark}", "check --limit and the data directory")
        started = time.perf_counter()
        records = runner.run(items, progress=progress)
    finally:
        if owned and isinstance(target, PipelineTarget):
            target.pipeline.close()  # its engine loop's tasks end here, not as "Task was destroyed" at exit
    summary = summarize(records, config, session_seconds=time.perf_counter() - started)
    stamp(summary, args=config.model_dump(), backend=target.backend)
    write_report(out, summary)
    return summary
