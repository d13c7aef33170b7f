#!/usr/bin/env bash
# Issue 16's upcycling run: the dense W2 twin trained for $N steps, then two arms of $M
# steps from those weights, each with a fresh optimizer and the recipe's schedule: the
# dense model continued (train.init_from) and the same model upcycled to $EXPERTS
# experts, top-$TOPK, cut $G ways (fine-grained: experts of d_ff / G, so a token's active
# FLOPs equal the dense model's and equal steps are equal FLOPs). Then `moelab compare`
# of the two arms (curves against tokens and FLOPs, a table). One GPU.
#
#   bash benchmarks/upcycle_vs_dense.sh [a.b=c ...]     # overrides go to every run
#   DENSE=proxies/dense_tiny EXPERTS=8 TOPK=2 G=2 N=20 M=20 DATA=stdlib \
#       bash benchmarks/upcycle_vs_dense.sh train.accelerator=cpu   # a quick check on a CPU
#
# Defaults: proxies/dense_w2 (d_ff 2048) -> 64 experts top-8 of 256 (G = 8: the shape of
# proxies/qwen3_moe_w2), N = M = 1,500 steps of 8 x 2,048 tokens, data as the 100M-token
# comparison (DATA, MAX_CHARS). Runs land in $RUNS (default runs/upcycle-<time>); the
# table is printed and written to $RUNS/compare/compare.md.
set -u
source "$(dirname "$0")/_common.sh"
RUNS=${RUNS:-runs/upcycle-$(date +%Y%m%d-%H%M%S)}
DENSE=${DENSE:-proxies/dense_w2}
EXPERTS=${EXPERTS:-64}; TOPK=${TOPK:-8}; G=${G:-8}
N=${N:-1500}; M=${M:-1500}
DATA=${DATA:-site-packages}
MAX_CHARS=${MAX_CHARS:-420000000}
mkdir -p "$RUNS"
COMMON=("train.run_dir=$RUNS" "train.val_every=$(( M / 4 > 0 ? M / 4 : 1 ))" "train.expert_image_every=0"
        "data.source=$DATA" "data.max_chars=$MAX_CHARS")

step dense "$PY" -m lit_modules.cli train "$DENSE" "${COMMON[@]}" train.run_name=dense "train.max_steps=$N" \
    train.ckpt_every=0 "$@"
step upcycle "$PY" -m lit_modules.cli upcycle "$RUNS/dense" "$RUNS/upcycled_model" --experts "$EXPERTS" \
    --top-k "$TOPK" --granularity "$G"
step dense_continued "$PY" -m lit_modules.cli train "$DENSE" "${COMMON[@]}" train.run_name=dense_continued \
    "train.init_from=$RUNS/dense" "train.max_steps=$M" train.ckpt_every=-1 "$@"
step upcycled "$PY" -m lit_modules.cli train "$RUNS/upcycled_model/recipe.yaml" "${COMMON[@]}" \
    train.run_name=upcycled "train.max_steps=$M" train.ckpt_every=-1 "$@"
step compare "$PY" -m lit_modules.cli compare "$RUNS/dense_continued" "$RUNS/upcycled" --out "$RUNS/compare"
cat "$RUNS/compare/compare.md" 2>/dev/null
finish
