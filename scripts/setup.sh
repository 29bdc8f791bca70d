#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with torch 2.13.0 (installed
# first and explicitly, so pip never resolves a multi-GB CUDA build), the project with its test
# extras, and the offline assets (MiniLM, GPT-2 tokenizer, public-domain texts).
#
#   bash scripts/setup.sh            # venv + project + minimal assets (what the tests and main job need)
#   bash scripts/setup.sh --full     # also SmolLM2-135M and the Python-docs corpus
#
# Idempotent: a second run only checks. VENV=/path overrides the environment folder.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
ASSET_MODE="--minimal"
[[ "${1:-}" == "--full" ]] && ASSET_MODE="--full"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0"
    "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import hedgehog_attention, pytest, triton, rdata" 2>/dev/null \
    || [[ "$REPO/pyproject.toml" -nt "$VENV/.hedgehog-installed" ]]; then
    echo "[setup] installing hedgehog-attention[test] (editable)"
    "$PY" -m pip install -q -e "$REPO[test]"
    touch "$VENV/.hedgehog-installed"
fi
echo "[setup] offline assets ($ASSET_MODE)"
PYTHON="$PY" bash "$REPO/scripts/setup_assets.sh" "$ASSET_MODE"
echo "[setup] ready: $("$PY" -c 'import torch, hedgehog_attention as h; print("torch", torch.__version__, "| hedgehog-attention", h.__version__)')"
