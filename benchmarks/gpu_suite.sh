#!/usr/bin/env bash
# The reference workloads of ../shared/reference/performance.md on one GPU, through
# `moelab bench` (python -m lit_modules.cli: this runs from the source tree):
#   W1  one MoE layer at Qwen3-30B-A3B shape vs a dense SwiGLU of the same active FLOPs
#   W2  whole-model training step, Qwen3-MoE proxy, moelab vs HF transformers
#   W3  whole-model training step, Gemma 3 proxy, moelab vs HF transformers
#   W2_dense  the dense twin of W2 (same active parameters), moelab only
# About 4 minutes on one H100. Tables go to stdout; one JSON file per workload goes
# to $OUT (default bench_out/). A workload that fails is reported and the rest still run.
#
#   PYTHONPATH=/path/to/omegaconf:$PYTHONPATH bash benchmarks/gpu_suite.sh
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
failed=()

run() {  # run NAME ARGS...: one `moelab bench`, its JSON saved as $OUT/NAME.json
    local name=$1; shift
    echo
    echo "=== $name: moelab bench $*"
    local t0=$SECONDS
    if ! "$PY" -m lit_modules.cli bench "$@" --save "$OUT/$name.json"; then
        failed+=("$name")
    fi
    echo "($name took $((SECONDS - t0)) s)"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

# rows: the recipe's layer (grouped_mm, global balancing loss), no balancing loss,
# capacity factor 1.25 (token dropping), the loop reference, the dense floor
run W1 qwen3/30b_a3b --layer --tokens 16384 --with-loop --steps 30 --measure-ceiling \
    --variant model.moe.balance.aux_coef=0 --variant model.moe.capacity_factor=1.25
# whole models twice: bf16-mixed (fp32 master weights, how `moelab train` runs on a
# GPU) and pure bf16 (the condition of the reference HF figures)
run W2 proxies/qwen3_moe_w2 --vs-hf
run W2_bf16 proxies/qwen3_moe_w2 --vs-hf --dtype bf16
run W2_dense proxies/dense_w2
run W3 proxies/gemma3_w3 --vs-hf
run W3_bf16 proxies/gemma3_w3 --vs-hf --dtype bf16

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all workloads ran; JSON in $OUT/"
