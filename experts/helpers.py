"""What routers borrow from a model, built on a backend and handed to them: an LLM that writes a
short text per prompt (Symbolic-MoE's skills, GLIDER's instructions) and a base model's token
states (GLIDER's local gates). Routers never start a model themselves (routers/llm_writer.py,
routers/glider.py take these as callables)."""

from __future__ import annotations

from core.catalog import Catalog
from core.types import GenerationParams, GenerationRequest, Message
from experts.backends.dtype import AUTO


class LazyBackend:
    """The transformers backend over a catalog (its remote experts on the remote backend), started
    on first use (minutes of work are spared when every text is already cached)."""

    def __init__(self, catalog: Catalog, dtype: str = AUTO):
        self.catalog, self.dtype = catalog, dtype
        self._backend = None

    def __call__(self):
        if self._backend is None:
            from experts.backends import build_backend

            self._backend = build_backend("hf", self.catalog, dtype=self.dtype)
        return self._backend


class BackendLLM:
    """prompts, max_tokens -> one line of text each, written by `expert` (default: the catalog's)."""

    def __init__(self, backend: LazyBackend, expert: str | None = None):
        self.backend = backend
        self.expert = expert or backend.catalog.default_expert

    def __call__(self, prompts: list[str], max_tokens: int) -> list[str]:
        params = GenerationParams(max_tokens=max_tokens, stop=["\n"])
        requests = [GenerationRequest(expert=self.expert, params=params, messages=[Message(role="user", content=p)])
                    for p in prompts]
        return [answer.text for answer in self.backend().generate(requests)]


class BackendTokenStates:
    """texts, layer -> hidden states per token of the base model (adapters off), 16 texts a pass."""

    def __init__(self, backend: LazyBackend, base: str | None = None, max_tokens: int = 48):
        self.backend = backend
        catalog = backend.catalog
        self.base = base or catalog.get(catalog.default_expert).base
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str], layer: int) -> list:
        states = []
        for start in range(0, len(texts), 16):
            states += self.backend().token_states(self.base, texts[start : start + 16], layer, self.max_tokens)
        return states


def router_helpers(catalog: Catalog) -> dict:
    """Every helper a router may take, by option name (a router class lists the ones it takes in
    `helpers`); nothing starts until a router calls one. Token states come from float32 weights,
    as the gates were measured on; written texts in the serving dtype."""
    return {"llm": BackendLLM(LazyBackend(catalog)),
            "token_states": BackendTokenStates(LazyBackend(catalog, "float32"))}
