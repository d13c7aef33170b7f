#!/usr/bin/env bash
# train.document_mask on one GPU: the CUDA tests of the document masks (flex block
# masks against the eager reference, forward and gradients), then `moelab bench` of
# the W2/W3-style proxies with and without the masks (4 documents per random
# sequence, masks and document ids built in every step, blocks compiled as the
# recipes say), then a short compiled `moelab train` with the masks whose log is
# searched for recompilations (a new mask per batch must not recompile the blocks).
# Tables on stdout; one JSON per bench in $OUT (default bench_out/).
#
#   PYTHONPATH=/path/to/omegaconf:$PYTHONPATH bash benchmarks/document_mask_gpu.sh
set -o pipefail
source "$(dirname "$0")/_common.sh"
OUT=${OUT:-bench_out}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
mkdir -p "$OUT"
gpu_line

echo "=== CUDA tests: tests/arch/test_document_mask.py"
"$PY" -m pytest -q -p no:cacheprovider -rfs tests/arch/test_document_mask.py || failed+=(tests)

for recipe in proxies/gemma3_w3 proxies/qwen3_moe_w2 proxies/gpt_oss_w2 proxies/deepseek_v3_w2; do
    for dm in false true; do
        name="docmask_$(basename "$recipe")_$dm"
        echo
        echo "=== $name"
        timeout 600 "$PY" -m lit_modules.cli bench "$recipe" train.document_mask=$dm train.document_positions=$dm \
            --warmup "$WARMUP" --steps "$STEPS" --save "$OUT/$name.json" || failed+=("$name")
    done
done

echo
echo "=== moelab train proxies/gemma3_tiny with document masks, compiled (recompilations logged)"
runs=$(mktemp -d)
TORCH_LOGS=recompiles timeout 900 "$PY" -m lit_modules.cli train proxies/gemma3_tiny train.document_mask=true \
    train.document_positions=true train.compile=true train.max_steps=40 train.val_every=20 train.ckpt_every=-1 \
    train.run_dir="$runs" 2>&1 | tee "$OUT/docmask_train.log" | tail -n 5 || failed+=(train)
echo "recompilations logged: $(grep -c -i 'recompil' "$OUT/docmask_train.log")"
rm -rf "$runs"
finish
