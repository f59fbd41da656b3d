#!/usr/bin/env bash
# Prune the demo with the recipes users deploy and check that real vLLM serves every checkpoint,
# answering as transformers does (run by .ci/run):
#
#     bash scripts/vllm_serve_check.sh [WORK_DIR]          # default vllm-check-out; about 18 minutes
#
# Needs the project's environment in .venv (README set-up) and vLLM's in .venv-vllm
# (bash scripts/vllm_env.sh); PROJECT_PYTHON and VLLM_PYTHON point elsewhere. Checks the shipped
# dense demo and the demo pruned with tamp (50% unstructured), tamp_2of4, tamp_fp8, tamp_w8a8 and
# tamp_w4a16; then scripts/vllm_families.sh checks tiny models of the other families the same way.
# The servers run with --enforce-eager, which saves about a minute of torch.compile per checkpoint
# on 2 cores; the compiled path answers the same (see the README's serving section).
set -euo pipefail

WORK="${1:-vllm-check-out}"
PROJECT_PYTHON="${PROJECT_PYTHON:-.venv/bin/python}"
VLLM_PYTHON="${VLLM_PYTHON:-.venv-vllm/bin/python}"
for python in "$PROJECT_PYTHON" "$VLLM_PYTHON"; do
    if [ ! -x "$python" ]; then
        echo "vllm_serve_check.sh: no $python: build the project's environment (README) and vLLM's" \
             "(bash scripts/vllm_env.sh), or set PROJECT_PYTHON / VLLM_PYTHON" >&2
        exit 2
    fi
done
mkdir -p "$WORK"

checkpoints=(demo)
for recipe in tamp tamp_2of4 tamp_fp8 tamp_w8a8 tamp_w4a16; do
    name="$(basename "$recipe" .yaml)"
    # A small calibration set and few evaluation questions: this checks serving, not quality.
    "$PROJECT_PYTHON" -m tamp_modifier.cli.run --recipe "$recipe" --output "$WORK/$name" --overwrite \
        --num-samples 32 --eval-per-family 10 > "$WORK/prune_$name.log" 2>&1 \
        || { tail -30 "$WORK/prune_$name.log"; echo "vllm_serve_check.sh: tamp-prune --recipe $recipe failed" >&2; exit 1; }
    tail -1 "$WORK/prune_$name.log"
    checkpoints+=("$WORK/$name")
done

"$PROJECT_PYTHON" scripts/vllm_reference.py --output "$WORK/reference" --per-family 30 "${checkpoints[@]}" \
    2> "$WORK/reference.log"
"$VLLM_PYTHON" scripts/vllm_check.py "$WORK/reference" --server-arg=--enforce-eager

# The other families: tiny random models of each, pruned with tamp and tamp_w8a8, served the same way.
PROJECT_PYTHON="$PROJECT_PYTHON" VLLM_PYTHON="$VLLM_PYTHON" bash scripts/vllm_families.sh "$WORK/families"
