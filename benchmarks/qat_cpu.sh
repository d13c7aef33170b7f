#!/usr/bin/env bash
# PTQ vs QAT on a CPU: the tiny Qwen3-MoE proxy trained in float32 for T + N steps (the
# no-QAT arm); from its step-T checkpoint, the same N steps again with train.qat.format
# set (start_step = T: the same data, learning rates and optimizer state, only the
# forward differs). Every number is the loss `moelab eval` reports (its window_loss,
# after --quantize's quantize_weights_ for the quantized ones) on the first $VAL_CHARS
# characters of the default corpus's validation split (written to $WORK/val.txt).
# Results: benchmarks/results/qat_cpu.md. Usage: benchmarks/qat_cpu.sh [T] [N]
# (about 10 minutes at the defaults on 2 idle CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-400}
N=${2:-200}
WORK=${WORK:-/tmp/moelab_qat_cpu}
FORMATS="int4 int4_b32 fp8"
RECIPE=proxies/qwen3_moe_tiny
VAL_CHARS=${VAL_CHARS:-60000}
export PYTHONPATH=$PWD
moelab() { python3 -m lit_modules.cli "$@"; }
rm -rf "$WORK"; mkdir -p "$WORK"
COMMON=(train.run_dir="$WORK" train.precision=32-true train.accelerator=cpu train.val_every=0
        train.expert_image_every=0 train.max_steps=$((T + N)) train.keep_checkpoints=0)

python3 - "$WORK/val.txt" "$VAL_CHARS" <<'PY'
import sys
from arch import load_recipe
from lit_modules.data.corpus import Corpus
corpus = Corpus(load_recipe("proxies/qwen3_moe_tiny").data)
open(sys.argv[1], "w", encoding="utf-8").write("\n".join(corpus.split(corpus.plan(), "val"))[:int(sys.argv[2])])
PY

moelab train $RECIPE "${COMMON[@]}" train.run_name=base train.ckpt_every=$T
BASE_T=$WORK/base/checkpoints/$(printf 'step%08d.ckpt' "$T")
BASE_END=$WORK/base/checkpoints/$(printf 'step%08d.ckpt' $((T + N)))
for f in $FORMATS; do
  moelab train $RECIPE "${COMMON[@]}" train.run_name=qat_$f train.ckpt_every=0 \
      train.resume="$BASE_T" train.qat.format=$f train.qat.start_step=$T
done

# the table: each checkpoint loaded once, scored as `moelab eval [--quantize F]` scores it
python3 benchmarks/qat_cpu_table.py "$WORK" "$T" "$N" $FORMATS | tee "$WORK/table.md"
