#!/usr/bin/env bash
# The reference workloads of ../shared/reference/performance.md on one GPU, through
# `moelab bench` (python -m lit_modules.cli: this runs from the source tree), with the
# recipes' performance switches (train.compile, model.fused_ce_chunk) as they stand:
#   W1  one MoE layer at Qwen3-30B-A3B shape vs a dense SwiGLU of the same active
#       FLOPs, both compiled (train.compile=true), with the eager loop reference
#   W2  whole-model training step, Qwen3-MoE proxy, moelab vs HF transformers
#   W3  whole-model training step, Gemma 3 proxy, moelab vs HF transformers
#   W2_dense  the dense twin of W2 (same active parameters), moelab only
# and issue 18's rows, shapes no reference names: W2n, a Qwen3-MoE proxy with more,
# narrower experts (128 of 128) and longer sequences (4 x 4096) than W2; W3h, a Gemma 3
# proxy with head_dim 256 and a longer window (1024) and context (4 x 4096) than W3
# (both pure bf16, vs HF); W1 at Qwen3-235B-A22B's shape; a proxy derived from the
# reference recipe with proxy.* alone (auto switches against none); the expert backends.
# W2 and W3 run in pure bf16 (the condition of the reference HF figures) and in
# bf16-mixed (fp32 master weights, how `moelab train` runs on a GPU).
#
# First, untimed and in parallel, one step of each compiled configuration fills
# torch.compile's on-disk caches (FX graphs, Triton kernels), so that the timed runs,
# one after the other, load their graphs instead of compiling each in turn. Then the
# timed runs, most important first; each has a time limit, and one that fails is
# reported while the rest still run. About 10 minutes on one GPU; 5 as three parts on
# three GPUs (ROWS, below).
# Tables go to stdout; JSON per workload, and a kernel profile of W2, go to $OUT.
# ROWS names the rows to run (default: all, in the order below); only their compiled
# configurations are warmed. On a machine with several GPUs, two halves can run side by
# side, one GPU each (each row still has its GPU to itself):
#
#   PYTHONPATH=/path/to/omegaconf:$PYTHONPATH bash benchmarks/gpu_suite.sh
#   CUDA_VISIBLE_DEVICES=1 OUT=out_b ROWS="W2n_bf16 W3h_bf16 W1_235" bash benchmarks/gpu_suite.sh
source "$(dirname "$0")/_common.sh"
OUT=${OUT:-bench_out}
WARM_LOG=${WARM_LOG:-/tmp/moelab_warm.log}
STEPS=${STEPS:-10}    # timed steps per run (the median is reported)
WARMUP=${WARMUP:-3}
ALL_ROWS="W2_bf16 W3_bf16 W1 W2 W3 profile sdpa_gqa W2_dense W2n_bf16 W3h_bf16 W1_235 fast_default expert_kernels"
ROWS=${ROWS:-$ALL_ROWS}
for row in $ROWS; do
    [[ " $ALL_ROWS " == *" $row "* ]] || { echo "gpu_suite.sh: unknown row '$row' in ROWS; rows: $ALL_ROWS"; exit 2; }
done
want() { [[ " $ROWS " == *" $1 "* ]]; }
mkdir -p "$OUT"

W1=(qwen3/30b_a3b train.compile=true --layer --tokens 16384)
W2=(proxies/qwen3_moe_w2)
W3=(proxies/gemma3_w3)
W1_235=(qwen3/235b_a22b train.compile=true --layer --tokens 16384)
W2n=(proxies/qwen3_moe_w2 model.moe.n_experts=128 model.moe.d_expert=128 train.seq_len=4096 train.micro_batch_size=4)
W3h=(proxies/gemma3_w3 model.attention.head_dim=256 model.attention.query_pre_attn_scalar=256
     model.layer_kinds.local.window=1024 train.seq_len=4096 train.micro_batch_size=4)

run() {  # run NAME LIMIT_S ARGS...: one timed `moelab bench`, its JSON in $OUT/NAME.json
    local name=$1 limit=$2; shift 2
    want "$name" || return 0
    echo
    echo "=== $name: moelab bench $*"
    local t0=$SECONDS
    if ! timeout "$limit" "$PY" -m lit_modules.cli bench "$@" --warmup "$WARMUP" --steps "$STEPS" \
            --save "$OUT/$name.json"; then
        failed+=("$name")
    fi
    echo "($name took $((SECONDS - t0)) s)"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

echo "=== warming the compile caches (untimed, in parallel)"
t0=$SECONDS
warm=()  # the compiled configurations of the rows asked for
want W1 && warm+=("${W1[*]}")
{ want W2_bf16 || want profile; } && warm+=("${W2[*]} --dtype bf16")
want W2 && warm+=("${W2[*]} --dtype bf16-mixed")
want W3_bf16 && warm+=("${W3[*]} --dtype bf16")
want W3 && warm+=("${W3[*]} --dtype bf16-mixed")
want W1_235 && warm+=("${W1_235[*]}")
want W2n_bf16 && warm+=("${W2n[*]} --dtype bf16")
want W3h_bf16 && warm+=("${W3h[*]} --dtype bf16")
for args in "${warm[@]}"; do
    # shellcheck disable=SC2086  # word splitting of $args is wanted
    timeout "${WARM_LIMIT:-150}" "$PY" -m lit_modules.cli bench $args --warmup 1 --steps 1 \
        >/dev/null 2>>"$WARM_LOG" &
done
wait
echo "(warming took $((SECONDS - t0)) s; its stderr, last lines:)"
tail -n 3 "$WARM_LOG"

run W2_bf16 90 "${W2[@]}" --vs-hf --dtype bf16
run W3_bf16 90 "${W3[@]}" --vs-hf --dtype bf16
# rows: the recipe's layer (grouped_mm, global balancing loss), the loop reference
# (eager), the dense floor; all on the same weights
run W1 90 "${W1[@]}" --with-loop --measure-ceiling
run W2 90 "${W2[@]}" --vs-hf --dtype bf16-mixed
run W3 90 "${W3[@]}" --vs-hf --dtype bf16-mixed
if want profile; then
    echo
    echo "=== W2 kernel profile (pure bf16)"
    timeout 60 "$PY" benchmarks/profile_step.py "${W2[@]}" --dtype bf16 >"$OUT/profile.txt" 2>&1 || failed+=(profile)
    head -40 "$OUT/profile.txt"
fi
want sdpa_gqa && { echo "=== SDPA flash backend with enable_gqa (W2's attention shape)"
timeout 30 "$PY" - <<'EOF' || failed+=(sdpa_gqa)
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
q = torch.randn(8, 16, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(8, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        print(backend.name, "takes enable_gqa: yes")
    except RuntimeError as e:
        print(backend.name, "takes enable_gqa: no", str(e).splitlines()[0][:120])
EOF
}
run W2_dense 60 proxies/dense_w2 --dtype bf16-mixed

# issue 18's rows
run W2n_bf16 120 "${W2n[@]}" --vs-hf --dtype bf16
run W3h_bf16 150 "${W3h[@]}" --vs-hf --dtype bf16
run W1_235 120 "${W1_235[@]}"
if want fast_default; then
    echo
    echo "=== fast by default: derived proxy, auto / off"
    DTYPE=bf16 ROWS="auto off" timeout 400 bash benchmarks/fast_default.sh || failed+=(fast_default)
fi
if want expert_kernels; then
    echo "=== expert kernels at the W1 shapes"
    timeout 300 "$PY" benchmarks/expert_kernels.py --no-loop --compile 2>&1 | grep -v Warning || failed+=(expert_kernels)
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all workloads ran; JSON in $OUT/"
