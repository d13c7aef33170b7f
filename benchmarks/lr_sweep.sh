#!/usr/bin/env bash
# Issue 16's learning-rate sweep: each model trained for $STEPS steps at each rate of
# $LRS (warmup and cosine as the recipe has them), all on the same tokens; a table of the
# final validation losses with the best rate per model marked. One GPU (or a CPU with
# the tiny proxies), bf16-mixed where the device has it.
#
#   bash benchmarks/lr_sweep.sh [a.b=c ...]            # overrides go to every run
#   MODELS="proxies/dense_tiny proxies/qwen3_moe_tiny" LRS="1e-3 3e-3" STEPS=50 \
#       bash benchmarks/lr_sweep.sh train.accelerator=cpu   # a quick check on a CPU
#
# Defaults: the W2 pair (proxies/qwen3_moe_w2 and its dense twin proxies/dense_w2),
# rates 5e-4 1e-3 2e-3 4e-3, 600 steps of 8 x 2,048 tokens, data as the 100M-token
# comparison used (DATA, MAX_CHARS: site-packages, 420M characters; the BPE and token
# cache are made by the first run and reused). Runs land in $RUNS (default
# runs/lr-<time>); the table is printed and written to $RUNS/sweep.md.
set -u
source "$(dirname "$0")/_common.sh"
RUNS=${RUNS:-runs/lr-$(date +%Y%m%d-%H%M%S)}
MODELS=${MODELS:-"proxies/qwen3_moe_w2 proxies/dense_w2"}
LRS=${LRS:-"5e-4 1e-3 2e-3 4e-3"}
STEPS=${STEPS:-600}
DATA=${DATA:-site-packages}
MAX_CHARS=${MAX_CHARS:-420000000}
mkdir -p "$RUNS"

for model in $MODELS; do
    for lr in $LRS; do
        name="$(basename "$model")_lr$lr"
        step "$name" "$PY" -m lit_modules.cli train "$model" "train.run_dir=$RUNS" "train.run_name=$name" \
            "train.optim.lr=$lr" "train.max_steps=$STEPS" "train.val_every=$STEPS" "train.ckpt_every=-1" \
            "train.expert_image_every=0" "data.source=$DATA" "data.max_chars=$MAX_CHARS" "$@"
    done
done

"$PY" - "$RUNS" "$MODELS" "$LRS" <<'PYEOF' | tee "$RUNS/sweep.md"
import json, sys
from pathlib import Path
runs, models, lrs = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
print("| model | " + " | ".join(f"lr {lr}" for lr in lrs) + " | best |")
print("|---|" + "---|" * (len(lrs) + 1))
for model in models:
    name = Path(model).name
    losses = {}
    for lr in lrs:
        f = runs / f"{name}_lr{lr}" / "summary.json"
        losses[lr] = json.loads(f.read_text()).get("val_loss") if f.exists() else None
    done = {lr: v for lr, v in losses.items() if v is not None}
    best = min(done, key=done.get) if done else None
    cells = [("failed" if v is None else (f"**{v:.4f}**" if lr == best else f"{v:.4f}")) for lr, v in losses.items()]
    print(f"| {name} | " + " | ".join(cells) + f" | {best or '-'} |")
PYEOF
finish
