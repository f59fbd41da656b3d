#!/usr/bin/env bash
# Check a saved checkpoint with compressed-tensors 0.17.0, the version vLLM 0.33 pins,
# in its own environment (it cannot share one with llmcompressor 0.14, which pins 0.19.0).
#   bash scripts/check_ct017.sh CHECKPOINT_DIR [VENV_DIR]
# The environment (default .venv-ct017) is made on first use: torch 2.13.0 first (a plain
# torch requirement would pull a multi-GB CUDA build), then compressed-tensors 0.17.0.
set -euo pipefail
checkpoint="${1:?usage: bash scripts/check_ct017.sh CHECKPOINT_DIR [VENV_DIR]}"
here="$(cd "$(dirname "$0")" && pwd)"
venv="${2:-$here/../.venv-ct017}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0
    # 0.17.0 imports psutil without declaring it (vLLM brings it along).
    "$venv/bin/pip" install -q compressed-tensors==0.17.0 psutil
fi
"$venv/bin/python" "$here/check_quantization_config.py" "$checkpoint"
