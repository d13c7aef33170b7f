#!/usr/bin/env bash
# Fast by default (lit_modules/runtime.py resolve_speed): a Qwen3-MoE proxy derived from
# the reference recipe with proxy.* alone, timed by `moelab bench` three ways on one GPU:
#   auto      the recipe's defaults (train.compile auto: on one GPU the compiled blocks
#             replayed as CUDA graphs; fused cross-entropy auto)
#   tuned     the tuned proxies' switches set by hand (compile, fused CE 4096, compiled chunks)
#   off       the switches off (the defaults before auto)
# "auto" must match "tuned" or beat it; "off" shows what auto saves. Also the tuned W2 recipe.
#
#   DTYPE=bf16 ROWS="auto tuned off" bash benchmarks/fast_default.sh
source "$(dirname "$0")/_common.sh"
DTYPE=${DTYPE:-bf16}
DERIVED=(qwen3/30b_a3b proxy.d_model=1024 proxy.n_layers=8 proxy.n_experts=64 proxy.vocab_size=32768
         train.micro_batch_size=8 train.seq_len=2048)
declare -A ROW=(
    [auto]=""
    [tuned]="train.compile=true model.fused_ce_chunk=4096 model.fused_ce_compile=true"
    [off]="train.compile=false model.fused_ce_chunk=0 model.fused_ce_compile=false"
)
for name in ${ROWS:-auto tuned off}; do
    echo "=== derived, $name: ${ROW[$name]}"
    # shellcheck disable=SC2086
    timeout 240 "$PY" -m lit_modules.cli bench "${DERIVED[@]}" ${ROW[$name]} --dtype "$DTYPE" --warmup 3 --steps 10 \
        | grep -E "tokens/s|MFU|peak|switches|compiled|eager" | head -8
done
echo "=== proxies/qwen3_moe_w2 (tuned recipe)"
timeout 240 "$PY" -m lit_modules.cli bench proxies/qwen3_moe_w2 --dtype "$DTYPE" --warmup 3 --steps 10 \
    | grep -E "tokens/s|MFU|peak|switches|compiled|eager" | head -8
