"""Hugging Face transformers backend: batched generation, one base copy serving all its LoRA experts.

Experts live in a tiered memory pool (experts/pool.py): `HFMover` reads weights into RAM (host),
instantiates models around them (device: ready to run) and frees them, within the pool's budgets.
Every LoRA expert of a base is a named peft adapter on the single in-memory copy of that base;
a batch that mixes experts of one base runs in one `generate` call with peft's
`adapter_names` (one name per row, `__base__` for the bare base), not one pass per adapter.
Requests that arrive one by one (`agenerate`, a server) are micro-batched (base.MicroBatching).
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from itertools import islice

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from core.catalog import Catalog, ExpertSpec
from core.config import PoolConfig
from core.errors import PromptTooLongError, UnsupportedFieldError
from core.types import Capabilities, ExpertAnswer, GenerationRequest, StreamPiece
from experts.backends.base import (
    MicroBatching,
    StopScanner,
    cut_at_stop,
    forced_tool_schema,
    iterate_in_thread,
    render_prompt,
    with_tool_calls,
)
from experts.backends.dtype import AUTO, resolve_dtype
from experts.capabilities import expert_capabilities
from experts.pool import Move, TieredPool
from experts.weights import base_model_dir, weight_files

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch

class _LoadedBase:
    """A base model instantiated and ready to run, with the LoRA adapters now on it."""

    def __init__(self, spec: ExpertSpec, tokenizer, model):
        self.spec = spec
        self.tokenizer = tokenizer
        self.model = model
        self.adapters: set[str] = set()
        # Held while its adapters change or it runs: an adapter can be loaded onto this base (a
        # prefetch) while another base computes, never while this one does.
        self.lock = threading.Lock()

    def add_adapter(self, name: str, config, state: dict) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        if not self.adapters:
            self.model = PeftModel(self.model, config, adapter_name=name).eval()
        else:
            self.model.add_adapter(name, config)
        set_peft_model_state_dict(self.model, state, adapter_name=name)
        self.model.eval()
        self.adapters.add(name)

    def remove_adapter(self, name: str) -> tuple:
        """Take an adapter off; returns its (config, state dict) for the host tier."""
        from peft import get_peft_model_state_dict

        config = self.model.peft_config[name]
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}
        self.adapters.discard(name)
        if self.adapters:
            self.model.set_adapter(next(iter(self.adapters)))  # never delete the active adapter
            self.model.delete_adapter(name)
        else:
            self.model = self.model.unload()  # the bare base model again, no LoRA layers left
        return config, state


class HFMover:
    """The HF backend's tier moves (experts/pool.py calls `move`). A base: disk -> host reads
    its safetensors into RAM in the serving dtype; host -> device instantiates the model around
    those tensors (no copy on a CPU); device -> host takes the tensors back and frees the model.
    A LoRA adapter: host holds its config and state dict; device adds it to its base's peft model.
    Freeing to disk drops what RAM held (the files are never written)."""

    def __init__(self, backend: HFBackend):
        self.backend = backend
        self.host: dict[str, object] = {}  # expert -> state dict (base) or (LoraConfig, state dict) (adapter)

    def move(self, move: Move) -> None:
        backend = self.backend
        spec = backend.catalog.get(move.expert)
        if move.source == "disk":
            self.host[spec.name] = self._read(spec)
        elif move.target == "device":
            if spec.kind == "base":
                backend._bases[spec.name] = _LoadedBase(spec, backend._tokenizer(spec.name), self._instantiate(spec))
            else:
                base = backend._bases[spec.base]
                with base.lock:  # its base may be running another batch
                    base.add_adapter(spec.name, *self.host.pop(spec.name))
        elif move.source == "device":
            if spec.kind == "base":
                loaded = backend._bases.pop(spec.name)
                if move.target == "host":
                    self.host[spec.name] = self._state_of(loaded.model)
            else:
                base = backend._bases[spec.base]
                with base.lock:
                    config_and_state = base.remove_adapter(spec.name)
                if move.target == "host":
                    self.host[spec.name] = config_and_state
        else:  # host -> disk
            self.host.pop(spec.name, None)

    def _read(self, spec: ExpertSpec):
        from safetensors.torch import load

        if spec.kind == "base":  # one model.safetensors, or a user's folder of shards
            return {k: v.to(self.backend.dtype) for path in weight_files(base_model_dir(spec))
                    for k, v in load(path.read_bytes()).items()}
        from peft import LoraConfig

        directory = self.backend.catalog.adapter_dir(spec)
        return LoraConfig.from_pretrained(str(directory)), load((directory / "adapter_model.safetensors").read_bytes())

    def _instantiate(self, spec: ExpertSpec):
        from transformers import AutoConfig
        from transformers.initialization import no_init_weights

        state = self.host.pop(spec.name)
        config = AutoConfig.from_pretrained(base_model_dir(spec))
        with no_init_weights():  # every weight comes from `state`: skip the random initialisation
            model = AutoModelForCausalLM.from_config(config, dtype=self.backend.dtype)
        missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
        if set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"{spec.name}: weights missing from its safetensors files: {missing[:3]}")
        model.tie_weights()
        return model.eval()

    @staticmethod
    def _state_of(model) -> dict:
        state = dict(model.state_dict())
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state


class HFBackend(MicroBatching):
    name = "hf"

    def __init__(self, catalog: Catalog, dtype: str = AUTO, max_batch_size: int = 32, threads: int | None = None,
                 pool: PoolConfig | dict | None = None):
        self.catalog = catalog
        self.dtype = getattr(torch, resolve_dtype(dtype))  # the dtype names of dtype.py are torch's
        self.max_batch_size = max_batch_size
        if threads:
            torch.set_num_threads(threads)
        self._bases: dict[str, _LoadedBase] = {}
        self._tokenizers: dict[str, object] = {}
        self._lock = threading.RLock()  # one forward pass at a time: torch already uses every core
        self.pool = TieredPool.from_config(PoolConfig.model_validate(pool or {}), HFMover(self))
        self.pool.add_catalog(catalog, self._size_of)

    def _size_of(self, spec: ExpertSpec) -> int:
        """Bytes in memory: parameters in the serving dtype; an adapter's file (float16) likewise."""
        element = torch.tensor([], dtype=self.dtype).element_size()
        if spec.kind == "base":
            return spec.params * element
        return spec.size_bytes * element // 2

    # -- residency -------------------------------------------------------------------------

    def load(self, expert: str) -> float:
        """Bring the expert to the device tier (instantiated); seconds of moves it took."""
        return self.pool.ensure(expert)

    def resident(self) -> dict[str, str]:
        return self.pool.residence()

    def capabilities(self, expert: str) -> Capabilities:
        """Tools where the template renders them; no structured output, logprobs or n here."""
        return expert_capabilities(self.catalog, self.catalog.get(expert), self.name)

    def _tokenizer(self, base: str):
        if base not in self._tokenizers:
            tokenizer = AutoTokenizer.from_pretrained(base_model_dir(self.catalog.get(base)))
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._tokenizers[base] = tokenizer
        return self._tokenizers[base]

    def tokenizer(self, expert: str):
        return self._tokenizer(self.catalog.get(expert).base)

    @torch.inference_mode()
    def token_states(self, base: str, texts: list[str], layer: int, max_tokens: int = 48) -> list:
        """Hidden states (numpy, one (tokens, hidden) array per text) of a base model at one layer,
        adapters off: what a PHATGOOSE-style gate in front of that layer reads. Layers above
        `layer` are skipped, so early layers cost a fraction of a full forward pass."""
        with self.pool.pinned([base]), self._lock, self._bases[self.catalog.get(base).base].lock:
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
            p = req.params
            sampling = None if p.greedy else (p.temperature, p.top_p, p.seed)
            # A seeded sample must not depend on what else is in the batch: it runs alone.
            alone = i if sampling is not None and p.seed is not None else None
            groups[(self.catalog.get(req.expert).base, sampling, alone)].append(i)
        for (base_name, _, _), indices in groups.items():
            it = iter(indices)
            while chunk := list(islice(it, self.max_batch_size)):
                batch = [requests[i] for i in chunk]
                with self.pool.pinned(dict.fromkeys(r.expert for r in batch)):  # on the device for the pass
                    for i, answer in zip(chunk, self._generate_batch(base_name, batch)):
                        answers[i] = answer
        return answers  # type: ignore[return-value]

    @staticmethod
    def _prompt(base: _LoadedBase, req: GenerationRequest) -> str:
        return render_prompt(base.tokenizer, base.spec.chat, req.messages, req.params)

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

    def _run_generate(self, base: _LoadedBase, batch: list[GenerationRequest], **extra):
        """One `generate` call for a batch of one base and one sampling setting; returns the output
        ids and the encoded prompts. Holds the backend lock and the base's lock for the whole call."""
        with torch.inference_mode(), self._lock, base.lock:
            tok = base.tokenizer
            enc = tok([self._prompt(base, r) for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            context = getattr(base.model.config, "max_position_embeddings", None)
            longest = int(enc["attention_mask"].sum(dim=1).max())
            if context and longest >= context:
                raise PromptTooLongError(f"the prompt has {longest} tokens; {batch[0].expert} takes at most {context - 1}",
                                         "shorten the messages")
            params = batch[0].params  # a group shares its sampling settings
            kwargs: dict = dict(max_new_tokens=max(r.params.max_tokens for r in batch), pad_token_id=tok.pad_token_id, **extra)
            if params.greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None)
                if params.seed is not None:
                    torch.manual_seed(params.seed)
            with self._adapter_scope(base, batch, kwargs):
                out = base.model.generate(**enc, **kwargs)
        return out, enc

    def _generate_batch(self, base_name: str, batch: list[GenerationRequest]) -> list[ExpertAnswer]:
        base = self._bases[base_name]
        out, enc = self._run_generate(base, batch)
        return [self._answer(base, req, out[row], enc, row) for row, req in enumerate(batch)]

    @staticmethod
    def _answer(base: _LoadedBase, req: GenerationRequest, output_ids, enc, row: int) -> ExpertAnswer:
        tok = base.tokenizer
        prompt_len = enc["input_ids"].shape[1]
        generated = output_ids[prompt_len:].tolist()[: req.params.max_tokens]
        ended = tok.eos_token_id in generated
        if ended:
            generated = generated[: generated.index(tok.eos_token_id)]
        text, stopped = cut_at_stop(tok.decode(generated, skip_special_tokens=True), req.params.stop)
        if stopped:
            generated = tok(text, add_special_tokens=False)["input_ids"]
        return with_tool_calls(ExpertAnswer(
            expert=req.expert,
            text=text.strip(),
            prompt_tokens=int(enc["attention_mask"][row].sum()),
            completion_tokens=len(generated) + (1 if ended else 0),
            finish_reason="stop" if ended or stopped else "length",
        ), req.params)

    # -- streaming -------------------------------------------------------------------------

    def stream(self, request: GenerationRequest) -> Iterator[StreamPiece]:
        """transformers' TextIteratorStreamer on a generation thread; one request per generate call
        (the streamer takes a batch of one). Closing the iterator stops the generation at the next
        token through a stopping criterion."""
        base_name = self.catalog.get(request.expert).base
        streamer = TextIteratorStreamer(self._tokenizer(base_name), skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        outcome: dict = {}

        def run() -> None:
            try:
                with self.pool.pinned([request.expert]):  # on the device, and kept there, for the whole stream
                    outcome["base"] = self._bases[base_name]
                    outcome["out"], outcome["enc"] = self._run_generate(
                        outcome["base"], [request], streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
            except BaseException as exc:  # handed to the consumer below
                outcome["error"] = exc
                streamer.end()

        thread = threading.Thread(target=run, name="coe-hf-stream", daemon=True)
        thread.start()
        scanner = StopScanner(request.params.stop)
        try:
            for piece in streamer:
                if text := scanner.feed(piece):
                    yield StreamPiece(text=text)
                if scanner.stopped:
                    break
            else:
                if text := scanner.flush():
                    yield StreamPiece(text=text)
        finally:
            cancel.set()
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        yield StreamPiece(answer=self._answer(outcome["base"], request, outcome["out"][0], outcome["enc"], 0))

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamPiece]:
        """A streamed request runs alone, token by token (`stream`; closing it stops the
        generation); the others join micro-batches, the whole answer in one piece."""
        if forced_tool_schema(request.params) is not None:
            raise UnsupportedFieldError(f"expert {request.expert} runs on transformers, which cannot force a tool call",
                                        "tool_choice", "send tool_choice auto, or run the expert on vLLM")
        # A tool call is parsed from the whole text: such an answer comes in one piece.
        whole = not request.stream or request.params.uses_tools
        pieces = MicroBatching.astream(self, request) if whole else iterate_in_thread(self.stream(request))
        async for piece in pieces:
            yield piece


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)
