#!/usr/bin/env bash
# Knowledge distillation (train.distill), measured: a teacher is trained first, then a
# smaller student twice on the same tokens and steps (same seed, same data order):
# once on the next-token loss alone, once per distillation kind from the teacher, and
# once per kind in OFFLINE_KINDS with the teacher's targets cached first (moelab
# distill-cache, train.distill.mode=offline; the cache's build time is printed).
# Prints the validation losses as a markdown table (results: benchmarks/results/).
#
#   benchmarks/distill_cpu.sh          # CPU: tiny dense teacher -> tinier student, ~9 min on 2 shared cores
#   benchmarks/distill_cpu.sh gpu      # one GPU: the W2 MoE proxy (proxies/qwen3_moe_w2) -> a
#                                      # smaller MoE proxy of the same recipe
#
# A rerun with the same OUT keeps the runs that finished and does the rest (remove OUT
# to start over). Environment: OUT (default runs/distill_<mode>),
# TEACHER_STEPS, STUDENT_STEPS, KINDS (cpu: "sampled sampled_counts topk full", gpu: "sampled"),
# OFFLINE_KINDS (cpu: "topk", gpu: none; never full), K, ALPHA, TEMPERATURE, SEED.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
MODE=${1:-cpu}
OUT=${OUT:-runs/distill_$MODE}

case "$MODE" in
cpu)
  # One thread per process: on a CPU shared with other work, two OpenMP threads that
  # wait for each other made a step of this model 15x slower (0.5 s -> 8 s) here.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  RECIPE=proxies/dense_tiny
  COMMON="model.vocab_size=512 train.seq_len=128 train.micro_batch_size=8 train.val_every=100
          train.val_batches=16 train.ckpt_every=0 train.optim.warmup_steps=30"
  # 0.40M parameters: 96 wide, 3 layers
  TEACHER="model.d_model=96 model.n_layers=3 model.attention.n_heads=4 model.attention.n_kv_heads=2
           model.attention.head_dim=24 model.ffn.d_ff=256 train.max_steps=${TEACHER_STEPS:-600}"
  # 0.10M parameters: 48 wide, 2 layers
  STUDENT="model.d_model=48 model.n_layers=2 model.attention.n_heads=2 model.attention.n_kv_heads=1
           model.attention.head_dim=24 model.ffn.d_ff=128 train.max_steps=${STUDENT_STEPS:-300}"
  K=${K:-64}
  KINDS=${KINDS:-sampled sampled_counts topk full}
  OFFLINE_KINDS=${OFFLINE_KINDS-topk}
  ;;
gpu)
  # the W2 recipe as it is (491M parameters, 139M active; 600 steps of 8 x 2048 tokens)
  RECIPE=proxies/qwen3_moe_w2
  COMMON="train.ckpt_every=0"
  TEACHER="train.max_steps=${TEACHER_STEPS:-600}"
  # the same MoE recipe at half the width and depth, 32 experts (same tokenizer: the
  # BPE is keyed by the corpus and model.vocab_size, which the two share)
  STUDENT="model.d_model=512 model.n_layers=4 model.attention.n_heads=8 model.attention.n_kv_heads=2
           model.moe.n_experts=32 model.moe.d_expert=128 train.max_steps=${STUDENT_STEPS:-600}"
  K=${K:-256}
  KINDS=${KINDS:-sampled}
  OFFLINE_KINDS=${OFFLINE_KINDS-}
  ;;
*)
  echo "distill_cpu.sh: the mode is cpu or gpu, not '$MODE'." >&2
  exit 2
  ;;
esac
COMMON="$COMMON train.seed=${SEED:-1234}"  # the seed sets the data order too: the same for every run
KD="train.distill.k=$K train.distill.alpha=${ALPHA:-0.5} train.distill.temperature=${TEMPERATURE:-1.0}"

run() {  # run NAME OVERRIDES...
  local name=$1
  shift
  if [ -f "$OUT/$name/summary.json" ]; then  # finished by an earlier call: a rerun goes on from here
    echo "== $name: finished before, kept ($OUT/$name)"
    return
  fi
  echo "== $name: moelab train $RECIPE $COMMON $* train.run_dir=$OUT train.run_name=$name" | tr -s ' \n' ' '
  echo
  python3 -m lit_modules.cli train "$RECIPE" $COMMON "$@" "train.run_dir=$OUT" "train.run_name=$name" \
    > "$OUT/$name.out" 2>&1 || { tail -20 "$OUT/$name.out"; exit 1; }
  tail -1 "$OUT/$name.out"
}

mkdir -p "$OUT"
run teacher $TEACHER
run student_ce $STUDENT
for kind in $KINDS; do
  run "student_kd_$kind" $STUDENT $KD "train.distill.kind=$kind" "train.distill.teacher=$OUT/teacher"
done

for kind in $OFFLINE_KINDS; do
  name="student_kd_${kind}_offline"
  set -- $STUDENT $KD "train.distill.kind=$kind" "train.distill.teacher=$OUT/teacher" train.distill.mode=offline \
    "train.distill.cache=$OUT/cache_$kind"
  if [ ! -f "$OUT/cache_$kind/meta.json" ]; then
    echo "== cache_$kind: moelab distill-cache $RECIPE $COMMON $*" | tr -s ' \n' ' '
    echo
    start=$(date +%s)
    python3 -m lit_modules.cli distill-cache "$RECIPE" $COMMON "$@" > "$OUT/cache_$kind.out" 2>&1 \
      || { tail -20 "$OUT/cache_$kind.out"; exit 1; }
    echo "cache_$kind: $(( $(date +%s) - start )) s, $(du -sh "$OUT/cache_$kind" | cut -f1)" | tee -a "$OUT/cache_$kind.out"
  fi
  run "$name" "$@"
done

python3 - "$OUT" $KINDS $(for k in $OFFLINE_KINDS; do echo "${k}_offline"; done) <<'EOF'
import json, sys
from pathlib import Path

out, kinds = Path(sys.argv[1]), sys.argv[2:]
print(f"\n| run | params | steps | tokens | val loss (step 0 -> end) | val ppl | wall s |")
print("|---|---|---|---|---|---|---|")
for name in ["teacher", "student_ce"] + [f"student_kd_{k}" for k in kinds]:
    s = json.loads((out / name / "summary.json").read_text())
    print(f"| {name} | {s['params_total'] / 1e6:.2f}M | {s['steps']} | {s['tokens']:,} | "
          f"{s['initial_val_loss']:.4f} -> {s['val_loss']:.4f} | {s['val_ppl']:.2f} | {s['wall_seconds']:.0f} |")
EOF
