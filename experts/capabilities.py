"""What each expert can do beyond plain chat: the one rule the engine asks (Pipeline.capabilities).

- A remote expert: its catalog flags (`tools`, `json`, `logprobs`, `n` under `weights`); the
  endpoint does the work and coe passes the fields through.
- A local expert on vLLM: structured output (`response_format`, vLLM's own guided decoding),
  logprobs and n are the engine's; tools where its chat template renders them (below).
- A local expert on transformers (`hf`): tools where its chat template renders them; no
  structured output, logprobs or n (the backend does not implement them).
- A recorded (replay) expert: plain answers only.

Tools on a local model: its chat template must render the request's `tools` and follow the
Hermes/Qwen convention of `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks, which
experts/backends/base.py parses back into tool_calls. SmolLM2-135M-Instruct's template renders
neither (it has no tools), so the embedded experts have no tools: a request with tools goes to a
remote expert that has them, or is a 400 naming `tools`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from core.catalog import Catalog, ExpertSpec, GGUFPackageWeights, PathWeights, RecordedWeights, RemoteWeights
from core.paths import cache_dir
from core.types import Capabilities
from experts.weights import CONVERTED_MARKER, _gguf_cache_dir

TOOL_CALL_TAG = "<tool_call>"


def expert_capabilities(catalog: Catalog, spec: ExpertSpec, backend: str) -> Capabilities:
    """The capabilities of `spec` when it runs on `backend` (`vllm`, `hf`, `remote`, `replay`)."""
    weights = spec.weights
    if isinstance(weights, RemoteWeights):
        return Capabilities(tools=weights.tools, json_output=weights.json_output, logprobs=weights.logprobs,
                            n=weights.n)
    if isinstance(weights, RecordedWeights) or backend == "replay":
        return Capabilities()
    base = catalog.get(spec.base) if spec.kind == "lora" else spec
    tools = template_renders_tools(model_folder(base))
    if backend == "vllm":
        return Capabilities(tools=tools, json_output=True, logprobs=True, n=True)
    return Capabilities(tools=tools)


def model_folder(spec: ExpertSpec) -> Path | None:
    """A local base's model folder where it already exists (a GGUF file converted once), without
    converting anything; None before its first conversion."""
    weights = spec.weights
    if isinstance(weights, PathWeights):
        folder = _gguf_cache_dir(spec.name, weights.path) if weights.is_gguf else weights.path
    elif isinstance(weights, GGUFPackageWeights):
        folder = cache_dir() / "models" / spec.name
    else:
        return None
    if isinstance(weights, GGUFPackageWeights) or weights.is_gguf:
        return folder if (folder / CONVERTED_MARKER).is_file() else None
    return folder


def chat_template(folder: Path | None) -> str:
    """The chat template text of a model folder (chat_template.jinja, else tokenizer_config.json's
    `chat_template`, every named template of a list); empty when there is none."""
    if folder is None:
        return ""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text()).get("chat_template") or ""
    except (OSError, ValueError, AttributeError):
        return ""
    if isinstance(template, list):
        return "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return str(template)


@lru_cache(maxsize=256)
def template_renders_tools(folder: Path | None) -> bool:
    """The template renders a `tools` list and asks for Hermes-style <tool_call> blocks."""
    template = chat_template(folder)
    return "tools" in template and TOOL_CALL_TAG in template
