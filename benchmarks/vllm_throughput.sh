#!/usr/bin/env bash
# vLLM throughput of the formats we ship, dense BF16 against TAMP 50%, TAMP + W8A8 and TAMP + W4A16,
# on the demo model and on a random LLaVA with a 7B model's proportions scaled down
# (benchmarks/vllm_scaled_model.py), through examples/serve_vllm.py (vLLM's offline API):
#
#     bash benchmarks/vllm_throughput.sh [WORK_DIR]      # default vllm-bench-out
#
# Needs .venv (the project's) and .venv-vllm (bash scripts/vllm_env.sh; on a GPU, vllm 0.33 in
# .venv-vllm instead). Checkpoints already in WORK_DIR are reused, so a stopped run resumes.
# Figures go to benchmarks/results/vllm_throughput_{demo,scaled}.json and are printed.
set -euo pipefail

WORK="${1:-vllm-bench-out}"
PROJECT_PYTHON="${PROJECT_PYTHON:-.venv/bin/python}"
VLLM_PYTHON="${VLLM_PYTHON:-.venv-vllm/bin/python}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"  # GiB, on the CPU build
mkdir -p "$WORK/demo" benchmarks/results

prune() {  # prune OUTPUT RECIPE [tamp-prune arguments...]
    local output="$1" recipe="$2"
    shift 2
    [ -f "$output/config.json" ] && return 0
    "$PROJECT_PYTHON" -m tamp_modifier.cli.run "$@" --recipe "$recipe" --output "$output" > "$output.log" 2>&1 \
        || { tail -20 "$output.log"; exit 1; }
}

for recipe in tamp tamp_w8a8 tamp_w4a16; do
    prune "$WORK/demo/$(basename "$recipe" .yaml)" "$recipe" --num-samples 32 --eval-per-family 10
done
[ -f "$WORK/scaled/dense/config.json" ] || "$PROJECT_PYTHON" benchmarks/vllm_scaled_model.py --output "$WORK/scaled"
for recipe in tamp tamp_w8a8 tamp_w4a16; do
    prune "$WORK/scaled/$recipe" "$recipe" "$WORK/scaled/dense" --dataset "$WORK/scaled/calibration" --num-samples 16
done

demo_dir="$("$PROJECT_PYTHON" -c 'from tamp_modifier.demo.model import demo_model_path; print(demo_model_path())' | tail -1)"
demo=("$demo_dir" "$WORK/demo/tamp" "$WORK/demo/tamp_w8a8")
scaled=("$WORK/scaled/dense" "$WORK/scaled/tamp" "$WORK/scaled/tamp_w8a8")
# vllm-cpu on a CPU without AVX-512 has no W4A16 kernel (scripts/vllm_check.py says more): not timed there.
if "$VLLM_PYTHON" -c 'import sys; sys.path.insert(0, "scripts"); from vllm_check import cpu_without_4bit_kernel
sys.exit(cpu_without_4bit_kernel())' 2> /dev/null; then
    demo+=("$WORK/demo/tamp_w4a16")
    scaled+=("$WORK/scaled/tamp_w4a16")
else
    echo "vllm_throughput.sh: W4A16 not timed: this CPU has no AVX-512 and vllm-cpu's AVX2 kernels have no W4A16 GEMM"
fi
question="how many objects are there"
status=0
"$VLLM_PYTHON" examples/serve_vllm.py --question "$question" --prompts 512 --max-tokens 32 \
    --json benchmarks/results/vllm_throughput_demo.json "${demo[@]}" || status=1
"$VLLM_PYTHON" examples/serve_vllm.py --question "$question" --prompts 16 --max-tokens 32 \
    --json benchmarks/results/vllm_throughput_scaled.json "${scaled[@]}" || status=1
exit $status
