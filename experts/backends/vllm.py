"""vLLM backend: one async engine per base model; its LoRA experts are `LoRARequest`s on it.

Requests for any expert of a base share the engine's steps as they arrive (continuous batching),
so a mixed batch of LoRA experts runs together. The engines live on one background event loop,
so the synchronous pipeline and async callers (Serve) use the same engines.

vLLM starts its engine core in a spawned process: build this backend inside a function, a
`__main__` guard or a Ray actor, never at import time.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid

from experts.backends.base import GenerationRequest
from experts.catalog import Catalog
from experts.weights import base_model_dir
from orchestrator.errors import CoeError
from orchestrator.types import ExpertAnswer


class PromptTooLongError(CoeError):
    status_code = 400


class VLLMBackend:
    name = "vllm"

    def __init__(self, catalog: Catalog, dtype: str = "bfloat16", max_model_len: int = 2048, max_loras: int = 4,
                 max_lora_rank: int = 8, max_cpu_loras: int = 8, kv_cache_gib: float = 1.0,
                 max_num_seqs: int = 64, enforce_eager: bool = False):
        self.catalog = catalog
        self.settings = dict(dtype=dtype, max_model_len=max_model_len, max_loras=max_loras, max_lora_rank=max_lora_rank,
                             max_cpu_loras=max_cpu_loras, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager)
        # The CPU engine sizes its KV cache from this variable (its default is far too large here).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
        self._engines: dict[str, object] = {}
        self._tokenizers: dict[str, object] = {}
        self._adapters: set[str] = set()
        self._lora_ids = {e.name: i + 1 for i, e in enumerate(catalog.experts) if e.kind == "lora"}  # stable ids
        self._start_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="coe-vllm-loop", daemon=True).start()
        self.load_seconds: dict[str, float] = {}

    # -- residency -------------------------------------------------------------------------

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _engine(self, base: str):
        with self._start_lock:
            if base not in self._engines:
                started = time.perf_counter()
                self._engines[base] = self._run(self._start_engine(base))
                self.load_seconds[base] = time.perf_counter() - started
        return self._engines[base]

    async def _start_engine(self, base: str):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        path = str(base_model_dir(self.catalog.get(base)))
        self._tokenizers[base] = AutoTokenizer.from_pretrained(path)
        has_loras = bool(self.catalog.experts_of_base(base)[1:])
        args = AsyncEngineArgs(model=path, enable_lora=has_loras, disable_log_stats=True, **self.settings)
        return AsyncLLM.from_engine_args(args)

    def _lora_request(self, expert: str):
        spec = self.catalog.get(expert)
        if spec.kind != "lora":
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(expert, self._lora_ids[expert], str(self.catalog.adapter_dir(spec)))

    def load(self, expert: str) -> float:
        spec = self.catalog.get(expert)
        if spec.kind == "base" and spec.name in self._engines or spec.name in self._adapters:
            return 0.0
        started = time.perf_counter()
        engine = self._engine(spec.base)
        if spec.kind == "lora":
            self._run(engine.add_lora(self._lora_request(expert)))
            self._adapters.add(expert)
        seconds = time.perf_counter() - started
        self.load_seconds[expert] = seconds
        return seconds

    def unload(self, base: str) -> None:
        """On CPU an engine leaves memory by stopping (sleep mode is a no-op there)."""
        engine = self._engines.pop(base, None)
        if engine is not None:
            engine.shutdown()
            self._adapters -= {e.name for e in self.catalog.experts_of_base(base)}

    def resident(self) -> dict[str, str]:
        where = {base: "device" for base in self._engines}
        where.update({a: "device" for a in self._adapters})
        return where

    def shutdown(self) -> None:
        for base in list(self._engines):
            self.unload(base)
        self._loop.call_soon_threadsafe(self._loop.stop)

    # -- generation ------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        for base in {self.catalog.get(r.expert).base for r in requests}:
            self._engine(base)
        return self._run(self._generate_all(requests))

    async def _generate_all(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        results = await asyncio.gather(*(self.agenerate(r) for r in requests), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return list(results)

    async def agenerate(self, request: GenerationRequest) -> ExpertAnswer:
        """One request; runs on the backend's loop, alongside every other request of its base."""
        from vllm import SamplingParams

        spec = self.catalog.get(request.expert)
        engine = self._engines[spec.base]
        tokenizer = self._tokenizers[spec.base]
        messages = [m.model_dump() for m in request.messages]
        if spec.chat and tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) else list(ids)
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        limit = self.settings["max_model_len"]
        if len(ids) + 1 > limit:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens; {request.expert} takes at most {limit - 1}",
                                     "shorten the messages")
        p = request.params
        sampling = SamplingParams(max_tokens=min(p.max_tokens, limit - len(ids)), temperature=p.temperature,
                                  top_p=p.top_p, stop=p.stop or None, seed=p.seed)
        final = None
        async for output in engine.generate({"prompt_token_ids": ids}, sampling, uuid.uuid4().hex,
                                            lora_request=self._lora_request(request.expert)):
            final = output
        completion = final.outputs[0]
        return ExpertAnswer(expert=request.expert, text=completion.text.strip(), prompt_tokens=len(ids),
                            completion_tokens=len(completion.token_ids),
                            finish_reason="length" if completion.finish_reason == "length" else "stop")
