"""`coe experts train` really trains: a short real run writes a small adapter the backend can load."""

import json
import subprocess
import sys
from pathlib import Path

from experts.training import load_train_config


def test_train_config_covers_every_lora_expert(catalog):
    config = load_train_config()
    assert set(config.experts) == {e.name for e in catalog.experts if e.kind == "lora"}
    assert config.base == catalog.default_expert


def test_two_training_steps_write_a_loadable_float16_adapter(tmp_path, catalog):
    coe = str(Path(sys.executable).with_name("coe"))
    # Batches of 2, not the configured 8: a step's cost is mostly the 49k-token vocabulary's logits.
    run = subprocess.run([coe, "experts", "train", "--only", "smollm2-logic", "--steps", "2", "--batch-size", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    adapter = tmp_path / "smollm2-logic"
    log = json.loads((adapter / "train_log.json").read_text())
    assert log["steps"] == 2 and log["batch_size"] == 2 and log["train_examples"] > 500
    assert log["command"].startswith("coe experts train")
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    assert tensors and all(str(t.dtype) == "torch.float16" for t in tensors)
    assert (adapter / "adapter_model.safetensors").stat().st_size < 10_000_000

    from core.catalog import Catalog
    from core.types import GenerationParams, GenerationRequest, Message
    from experts.backends.hf import HFBackend

    trial = Catalog.model_validate({**catalog.model_dump(), "adapters_root": tmp_path})
    [answer] = HFBackend(trial, dtype="float32").generate([GenerationRequest(
        expert="smollm2-logic", messages=[Message(role="user", content="not ( True ) and ( True ) is")],
        params=GenerationParams(max_tokens=6))])
    assert answer.completion_tokens > 0
