#!/usr/bin/env bash
# PTQ vs QAT: a proxy trained for T + N steps (the no-QAT arm); from its step-T
# checkpoint, the same N steps again with train.qat.format set (start_step = T: the same
# data, learning rates and optimizer state, only the forward differs). Every number is
# the loss `moelab eval` reports (its window_loss, after --quantize's quantize_weights_
# for the quantized ones) on the first $VAL_CHARS characters of the corpus's validation
# split (written to $WORK/val.txt).
#
#   benchmarks/qat.sh cpu [T] [N]   # the tiny Qwen3-MoE proxy in float32 on a CPU
#                                   # (defaults 2000 400: ~17 min on 2 idle cores)
#   benchmarks/qat.sh gpu [T] [N]   # the W2 MoE proxy (proxies/qwen3_moe_w2), bf16-mixed,
#                                   # blocks compiled, on one GPU (defaults 600 300)
#
# RECIPE= trains another proxy (RECIPE=proxies/qwen3_moe_tiny ... gpu: the CPU run's model
# in bf16-mixed on a GPU); EXTRA_OVERRIDES="a.b=c ..." adds overrides to every run;
# QAT_OVERRIDES to the QAT runs alone, where {start} stands for the step-T checkpoint they
# resume from (Gemma 3's recipe, distilled from the unquantized starting weights:
# QAT_OVERRIDES="train.distill.teacher={start} train.distill.alpha=1.0").
# SEEDS="1 2 3" runs the whole comparison once per train.seed (initialisation and data
# order), side by side, in $WORK/seed<S>, then prints each column's mean and spread over
# the seeds ($WORK/seeds.md).
# Results: benchmarks/results/qat_cpu.md, qat_h100.md.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
MODE=${1:-cpu}
case "$MODE" in
cpu)
  T=${2:-2000}; N=${3:-400}
  RECIPE=${RECIPE:-proxies/qwen3_moe_tiny}
  VAL_CHARS=${VAL_CHARS:-60000}
  EXTRA=(train.precision=32-true train.accelerator=cpu)
  ;;
gpu)
  T=${2:-600}; N=${3:-300}
  RECIPE=${RECIPE:-proxies/qwen3_moe_w2}
  VAL_CHARS=${VAL_CHARS:-400000}
  EXTRA=()
  ;;
*)
  echo "qat.sh: the mode is cpu or gpu, not '$MODE'." >&2
  exit 2
  ;;
esac
WORK=${WORK:-/tmp/moelab_qat_$MODE}
FORMATS=${FORMATS:-int4 int4_b32 fp8}
read -r -a MORE <<< "${EXTRA_OVERRIDES:-}"
EXTRA+=("${MORE[@]}")
moelab() { "$PY" -m lit_modules.cli "$@"; }
rm -rf "$WORK"; mkdir -p "$WORK"

"$PY" - "$RECIPE" "$WORK/val.txt" "$VAL_CHARS" <<'PY'
import sys
from arch import load_recipe
from lit_modules.data.corpus import Corpus
corpus = Corpus(load_recipe(sys.argv[1]).data)
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(corpus.split(corpus.plan(), "val"))[:int(sys.argv[3])])
PY

one() {  # one() DIR [SEED]: the base run, a QAT run per format, and the table, in DIR
  local dir=$1 seed=${2:-}
  local common=(train.run_dir="$dir" "${EXTRA[@]}" train.val_every=0 train.expert_image_every=0
                train.max_steps=$((T + N)) train.keep_checkpoints=0 ${seed:+train.seed=$seed})
  mkdir -p "$dir"; [ "$dir" = "$WORK" ] || cp "$WORK/val.txt" "$dir/"
  moelab train $RECIPE "${common[@]}" train.run_name=base train.ckpt_every=$T
  local start qat=()
  start="$dir/base/checkpoints/$(printf 'step%08d.ckpt' "$T")"
  read -r -a qat <<< "${QAT_OVERRIDES:-}"
  for f in $FORMATS; do
    moelab train $RECIPE "${common[@]}" train.run_name=qat_$f train.ckpt_every=0 \
        train.resume="$start" train.qat.format=$f train.qat.start_step=$T "${qat[@]//\{start\}/$start}"
  done
  # the table: each checkpoint loaded once, scored as `moelab eval [--quantize F]` scores it
  "$PY" benchmarks/qat_table.py "$dir" "$T" "$N" $FORMATS | tee "$dir/table.md"
}

if [ -z "${SEEDS:-}" ]; then
  one "$WORK"
else  # one arm set per seed, side by side (a proxy small enough leaves the device room), then mean and spread
  for s in $SEEDS; do one "$WORK/seed$s" "$s" > "$WORK/seed$s.log" 2>&1 & done
  wait
  "$PY" benchmarks/qat_table.py --seeds "$WORK" $SEEDS | tee "$WORK/seeds.md"
fi
