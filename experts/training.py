"""Train the embedded LoRA experts with peft on tasks from the shared data.

`coe experts train` reads `experts/adapters/train_config.yaml` and writes each adapter
(adapter_config.json, adapter_model.safetensors in float16, train_log.json) under
experts/adapters/<expert>/. Same config and seed: same adapters, up to CPU float non-determinism.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, Field
from tqdm import tqdm

from core.catalog import ADAPTERS_ROOT, Catalog
from core.errors import ConfigError, unknown
from core.prompts import target_answer, user_prompt
from experts.backends.dtype import resolve_dtype
from experts.tasks import TASKS

TRAIN_CONFIG = ADAPTERS_ROOT / "train_config.yaml"


class LoraSettings(BaseModel):
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class RunSettings(BaseModel):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    max_length: int = Field(320, ge=32)


class ExpertTraining(BaseModel):
    task: str
    run: RunSettings = Field(default_factory=RunSettings)


class TrainConfig(BaseModel):
    base: str
    # float32: on this CPU a bfloat16 base trained no faster (measured: 10 s/step either way on GSM8K).
    dtype: str = "float32"
    seed: int = 0
    threads: int | None = None
    lora: LoraSettings = Field(default_factory=LoraSettings)
    experts: dict[str, ExpertTraining]


def load_train_config(path: Path = TRAIN_CONFIG) -> TrainConfig:
    config = TrainConfig.model_validate(yaml.safe_load(path.read_text()))
    for name, spec in config.experts.items():
        if spec.task not in TASKS:
            raise ConfigError(f"{path}: expert {name!r} names unknown task {spec.task!r}", f"tasks: {sorted(TASKS)}")
    return config


def _encode(tokenizer, item, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the chat and labels that train only on the assistant's answer."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_prompt(item)}], add_generation_prompt=True, tokenize=False
    )
    answer = target_answer(item) + tokenizer.eos_token
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[-max_length:]  # keep the answer whole; trim the question's start
    labels = ([-100] * len(prompt_ids) + answer_ids)[-max_length:]
    return ids, labels


def _batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, steps: int, rng: random.Random):
    """`steps` batches; examples of similar length share a batch so little compute goes to padding."""
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(len(encoded)))
        rng.shuffle(epoch)
        order += epoch
    order = order[: steps * batch_size]
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(encoded[i][0]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(examples, pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return input_ids, attention, labels


def train_expert(name: str, config: TrainConfig, catalog: Catalog, out_root: Path = ADAPTERS_ROOT) -> dict:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from experts.weights import base_model_dir

    if name not in config.experts:
        raise unknown("expert to train", name, config.experts)
    spec = config.experts[name]
    run = spec.run
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)

    base_dir = base_model_dir(catalog.get(config.base))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, resolve_dtype(config.dtype)))
    lora = LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()

    items = TASKS[spec.task].train()
    encoded = [_encode(tokenizer, item, run.max_length) for item in items]
    batches = _batches(encoded, run.batch_size, run.steps, rng)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, run.warmup_steps, run.steps)

    losses: list[float] = []
    started = time.perf_counter()
    progress = tqdm(batches, desc=f"train {name}", unit="step")
    for batch in progress:
        input_ids, attention, labels = _collate([encoded[i] for i in batch], tokenizer.pad_token_id or 0)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - started

    out_dir = out_root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    weights = out_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.float16) for k, v in load_file(str(weights)).items()}, str(weights))  # halves the file
    log = {
        "expert": name, "task": spec.task, "base": config.base, "train_examples": len(items),
        "steps": run.steps, "batch_size": run.batch_size, "lr": run.lr, "seconds": round(seconds, 1),
        "loss_first20": round(sum(losses[:20]) / min(20, len(losses)), 4),
        "loss_last20": round(sum(losses[-20:]) / min(20, len(losses)), 4),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapter_bytes": weights.stat().st_size,
        "command": f"coe experts train --only {name}",
    }
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log
