#!/usr/bin/env bash
# Gradient accumulation and the global-batch balancing loss, on one GPU: the W2 proxy
# trained on the same tokens (micro-batch 8 x 1, then 4 x 2 twice: the exact counts,
# which cost a routing pre-pass, and the running counts of Megatron-LM and Qwen, which
# do not). Prints tokens/s, validation loss, how far the running form's training loss
# drifts from the exact one's step by step, and the load imbalance (max / mean tokens
# per expert, averaged over layers and logged steps) of each.
#
#   bash benchmarks/accum_counts.sh [a.b=c ...]     # overrides go to every run
#
# STEPS (default 300) optimizer steps of 16K tokens each (8K for m4); about a minute per
# run on an H100 with compiled blocks. LAYOUTS picks some of m8 m4 m4x2_exact
# m4x2_running. Runs land in $RUNS; the table is printed and written to
# $RUNS/compare.md.
set -u
source "$(dirname "$0")/_common.sh"
RUNS=${RUNS:-runs/accum-$(date +%Y%m%d-%H%M%S)}
STEPS=${STEPS:-300}
COMMON=(proxies/qwen3_moe_w2 "train.run_dir=$RUNS" "train.max_steps=$STEPS" "train.val_every=$STEPS"
        "train.log_every=10" "train.expert_image_every=0" "train.ckpt_every=-1"
        "model.moe.balance.aux_scope=global")

# m4: micro-batch 4 without accumulation (half the tokens per step): the rate the
# accumulated layouts are held to (issue 18: within 10%), at the same rows per kernel;
# its losses see half the tokens, so only its tokens/s compares
declare -A LAYOUT=(
    [m8]="train.micro_batch_size=8 train.grad_accum=1"
    [m4]="train.micro_batch_size=4 train.grad_accum=1"
    [m4x2_exact]="train.micro_batch_size=4 train.grad_accum=2 model.moe.balance.global_counts=exact"
    [m4x2_running]="train.micro_batch_size=4 train.grad_accum=2 model.moe.balance.global_counts=running"
)
for name in ${LAYOUTS:-m8 m4 m4x2_exact m4x2_running}; do
    echo "=== $name: ${LAYOUT[$name]}"
    t0=$SECONDS
    # shellcheck disable=SC2086
    "$PY" -m lit_modules.cli train "${COMMON[@]}" "train.run_name=$name" ${LAYOUT[$name]} "$@" \
        > "/tmp/accum_$name.log" 2>&1 || { echo "($name failed)"; tail -5 "/tmp/accum_$name.log"; }
    echo "($name took $((SECONDS - t0)) s)"
done

"$PY" - "$RUNS" <<'EOF'
import json, sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

runs = Path(sys.argv[1])


def scalars(run):
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


data, rows = {}, []
for name in ("m8", "m4", "m4x2_exact", "m4x2_running"):
    f = runs / name / "summary.json"
    if not f.exists():
        rows.append(f"| {name} | failed |||||")
        continue
    s, sc = json.loads(f.read_text()), scalars(runs / name)
    data[name] = sc
    loads = [v for tag, series in sc.items() if tag.endswith("max_over_mean_load") for v in series.values()]
    imbalance = sum(loads) / len(loads) if loads else float("nan")
    rows.append(f"| {name} | {s['tokens_per_s']:,.0f} | {s['val_loss']:.4f} | {s['train_loss']:.4f} | {imbalance:.3f} |")
drift = "-"
if {"m4x2_exact", "m4x2_running"} <= set(data):
    a, b = data["m4x2_exact"]["train/loss"], data["m4x2_running"]["train/loss"]
    d = [abs(a[k] - b[k]) for k in a if k in b]
    aux_a, aux_b = data["m4x2_exact"].get("train/aux_loss", {}), data["m4x2_running"].get("train/aux_loss", {})
    da = [abs(aux_a[k] - aux_b[k]) / max(abs(aux_a[k]), 1e-12) for k in aux_a if k in aux_b]
    drift = (f"train loss, running vs exact over {len(d)} logged steps: mean |diff| {sum(d) / len(d):.4f}, "
             f"max {max(d):.4f}; aux loss relative diff mean {sum(da) / max(len(da), 1):.3f}")
table = "\n".join(["| layout | tokens/s | val loss | final train loss | mean max/mean load |",
                   "|---|---|---|---|---|", *rows, "", drift])
print(table)
(runs / "compare.md").write_text(table + "\n")
EOF
