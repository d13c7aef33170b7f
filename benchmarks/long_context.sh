#!/usr/bin/env bash
# Issue 15's long-context rows on one GPU: whole training steps of the W2 (Qwen3-MoE,
# global causal attention: SDPA's flash kernel) and W3 (Gemma 3, five sliding-window
# layers to one global: flex attention's block-sparse kernels) proxies at 8K and 32K
# tokens per sequence, 16K / 32K tokens per step, blocks compiled as the recipes say,
# bf16-mixed. At 32K also W2 with document masks (flex with a per-batch block mask) and
# W2 with activation checkpointing (what the 32K stage of proxies/qwen3_stages_w2_32k
# turns on). Tables on stdout; one JSON per bench in $OUT (default bench_out/).
# MFU counts every row's attention as full causal attention, so the document-mask row's
# MFU counts FLOPs its block-sparse kernel skips.
#
#   PYTHONPATH=/path/to/omegaconf:$PYTHONPATH bash benchmarks/long_context.sh
set -o pipefail
source "$(dirname "$0")/_common.sh"
OUT=${OUT:-bench_out}
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
mkdir -p "$OUT"
gpu_line

row() {  # row NAME RECIPE OVERRIDES...; ROWS="w2_8k w3_32k ..." runs those alone
    local name=$1; shift
    [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" $name "* ]] || return 0
    echo
    echo "=== $name: moelab bench $*"
    local t0=$SECONDS
    timeout "${LIMIT:-150}" "$PY" -m lit_modules.cli bench "$@" model.max_seq_len=32768 \
        --warmup "$WARMUP" --steps "$STEPS" --save "$OUT/$name.json" || failed+=("$name")
    echo "($name took $((SECONDS - t0)) s)"
}

row w2_8k proxies/qwen3_moe_w2 train.seq_len=8192 train.micro_batch_size=2
row w2_32k proxies/qwen3_moe_w2 train.seq_len=32768 train.micro_batch_size=1
row w2_32k_docmask proxies/qwen3_moe_w2 train.seq_len=32768 train.micro_batch_size=1 \
    train.document_mask=true train.document_positions=true
row w2_32k_ckpt proxies/qwen3_moe_w2 train.seq_len=32768 train.micro_batch_size=1 train.activation_checkpointing=true
row w3_8k proxies/gemma3_w3 train.seq_len=8192 train.micro_batch_size=2
row w3_32k proxies/gemma3_w3 train.seq_len=32768 train.micro_batch_size=1
finish
