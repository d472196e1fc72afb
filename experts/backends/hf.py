"""Hugging Face transformers backend: batched generation, one base copy serving all its LoRA experts.

Every LoRA expert of a base is a named peft adapter on the single in-memory copy of that base;
a batch that mixes experts of one base runs in one `generate` call with peft's
`adapter_names` (one name per row, `__base__` for the bare base), not one pass per adapter.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from itertools import islice

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experts.backends.base import GenerationRequest, MicroBatching, cut_at_stop, render_prompt
from experts.catalog import Catalog, ExpertSpec
from experts.weights import base_model_dir
from orchestrator.types import ExpertAnswer

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class _LoadedBase:
    def __init__(self, spec: ExpertSpec, dtype: torch.dtype):
        path = base_model_dir(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.adapters: set[str] = set()
        self.spec = spec

    def add_adapter(self, name: str, path) -> None:
        from peft import PeftModel

        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
        else:
            self.model.load_adapter(str(path), adapter_name=name)
        self.adapters.add(name)


class HFBackend(MicroBatching):
    name = "hf"

    def __init__(self, catalog: Catalog, dtype: str = "bfloat16", max_batch_size: int = 32, threads: int | None = None):
        self.catalog = catalog
        self.dtype = DTYPES[dtype]
        self.max_batch_size = max_batch_size
        if threads:
            torch.set_num_threads(threads)
        self._bases: dict[str, _LoadedBase] = {}
        self._lock = threading.RLock()  # one forward pass at a time: torch already uses every core

    # -- residency -------------------------------------------------------------------------

    def load(self, expert: str) -> float:
        spec = self.catalog.get(expert)
        started = time.perf_counter()
        with self._lock:
            base = self._bases.get(spec.base)
            if base is None:
                base = self._bases[spec.base] = _LoadedBase(self.catalog.get(spec.base), self.dtype)
            elif spec.kind == "base" or spec.name in base.adapters:
                return 0.0
            if spec.kind == "lora":
                base.add_adapter(spec.name, self.catalog.adapter_dir(spec))
        return time.perf_counter() - started

    def resident(self) -> dict[str, str]:
        where: dict[str, str] = {}
        for base_name, base in self._bases.items():
            where[base_name] = "device"
            where.update({a: "device" for a in base.adapters})
        return where

    def tokenizer(self, expert: str):
        self.load(expert)
        return self._bases[self.catalog.get(expert).base].tokenizer

    @torch.inference_mode()
    def token_states(self, base: str, texts: list[str], layer: int, max_tokens: int = 48) -> list:
        """Hidden states (numpy, one (tokens, hidden) array per text) of a base model at one layer,
        adapters off: what a PHATGOOSE-style gate in front of that layer reads. Layers above
        `layer` are skipped, so early layers cost a fraction of a full forward pass."""
        self.load(base)
        with self._lock:
            loaded = self._bases[self.catalog.get(base).base]
            model = loaded.model.get_base_model() if loaded.adapters else loaded.model
            decoder = model.model
            kept = decoder.layers
            decoder.layers = kept[:layer]
            try:
                enc = loaded.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
                hidden = decoder(**enc).last_hidden_state.float()
            finally:
                decoder.layers = kept
        mask = enc["attention_mask"].bool()
        return [hidden[row][mask[row]].numpy() for row in range(len(texts))]

    # -- generation ------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        answers: list[ExpertAnswer | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            self.load(req.expert)
            p = req.params
            sampling = None if p.greedy else (p.temperature, p.top_p, p.seed)
            # A seeded sample must not depend on what else is in the batch: it runs alone.
            alone = i if sampling is not None and p.seed is not None else None
            groups[(self.catalog.get(req.expert).base, sampling, alone)].append(i)
        for (base_name, _, _), indices in groups.items():
            it = iter(indices)
            while chunk := list(islice(it, self.max_batch_size)):
                for i, answer in zip(chunk, self._generate_batch(base_name, [requests[i] for i in chunk])):
                    answers[i] = answer
        return answers  # type: ignore[return-value]

    @staticmethod
    def _prompt(base: _LoadedBase, req: GenerationRequest) -> str:
        return render_prompt(base.tokenizer, base.spec.chat, req.messages)

    @staticmethod
    def _adapter_scope(base: _LoadedBase, batch: list[GenerationRequest], kwargs: dict):
        """Select the LoRA weights for a batch. One expert for every row: activate it (or disable
        adapters for the bare base), the fast path. Mixed experts: peft's per-row `adapter_names`,
        one forward pass for all of them (measured 2.3x slower per token than the fast path, so
        only where the batch really mixes)."""
        if not base.adapters:
            return contextlib.nullcontext()
        names = [r.expert if r.expert in base.adapters else BASE_ADAPTER for r in batch]
        if len(set(names)) > 1:
            kwargs["adapter_names"] = names
            return contextlib.nullcontext()
        if names[0] == BASE_ADAPTER:
            return base.model.disable_adapter()
        base.model.set_adapter(names[0])
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _generate_batch(self, base_name: str, batch: list[GenerationRequest]) -> list[ExpertAnswer]:
        with self._lock:
            base = self._bases[base_name]
            tok = base.tokenizer
            enc = tok([self._prompt(base, r) for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            params = batch[0].params  # a group shares its sampling settings
            kwargs: dict = dict(max_new_tokens=max(r.params.max_tokens for r in batch), pad_token_id=tok.pad_token_id)
            if params.greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None)
                if params.seed is not None:
                    torch.manual_seed(params.seed)
            with self._adapter_scope(base, batch, kwargs):
                out = base.model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        answers = []
        for row, req in enumerate(batch):
            generated = out[row, prompt_len:].tolist()
            generated = generated[: req.params.max_tokens]
            ended = tok.eos_token_id in generated
            if ended:
                generated = generated[: generated.index(tok.eos_token_id)]
            text, stopped = cut_at_stop(tok.decode(generated, skip_special_tokens=True), req.params.stop)
            if stopped:
                generated = tok(text, add_special_tokens=False)["input_ids"]
            answers.append(
                ExpertAnswer(
                    expert=req.expert,
                    text=text.strip(),
                    prompt_tokens=int(enc["attention_mask"][row].sum()),
                    completion_tokens=len(generated) + (1 if ended else 0),
                    finish_reason="stop" if ended or stopped else "length",
                )
            )
        return answers
