#!/usr/bin/env bash
# Scale-out on one host with two GPUs: the W2 Qwen3-MoE proxy (recipes/proxies/qwen3_moe_w2.yaml)
# trained by `moelab train` for $STEPS steps under
#     auto (1 GPU) | ddp (2) | fsdp = FSDP2 (2) | fsdp + expert_parallel=2 (2)
# on the same global batch of 8 x 2048 tokens (1 GPU: 2 micro-batches of 4; 2 GPUs:
# one micro-batch of 4 each), so the first-step losses must agree (bf16-mixed: to about
# 1e-3, not bit for bit). tokens/s is the run's steady rate (the first logging interval,
# start-up and compilation, is left out) over all GPUs; "per GPU" divides by the GPUs,
# "vs 1 GPU" compares that with the 1-GPU run of this same script.
#
#   bash benchmarks/scale_2gpu.sh [a.b=c ...]      # overrides go to every run
#
# Budget: under 5 minutes on 2 x H200 (4 runs of ~1 minute: start-up, data cache on the
# first run only, 30 steps, the final checkpoint, deleted after each run to spare the
# disk). COMPILE=true compiles the blocks (faster steps, slower start). Table printed
# last, also written to $RUNS/scale.md.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast stays off on these machines
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs/scale2-$(date +%Y%m%d-%H%M%S)}
STEPS=${STEPS:-30}
COMPILE=${COMPILE:-false}
COMMON=("train.run_dir=$RUNS" "train.max_steps=$STEPS" "train.log_every=1" "train.val_every=0"
        "train.ckpt_every=0" "train.compile=$COMPILE" "train.seq_len=2048" "train.micro_batch_size=4"
        "data.source=stdlib" "data.max_chars=4000000")

run() {  # name, extra overrides...
    local name=$1; shift
    echo "=== $name: moelab train proxies/qwen3_moe_w2 $*"
    local t0=$SECONDS
    "$PY" -m lit_modules.cli train proxies/qwen3_moe_w2 "${COMMON[@]}" "train.run_name=$name" "$@" \
        || echo "($name failed)"
    rm -rf "$RUNS/$name/checkpoints"  # 5.9 GB each with AdamW state; not needed here
    echo "($name took $((SECONDS - t0)) s)"
}

run gpu1      train.strategy=auto train.devices=1 train.grad_accum=2 "$@"
run ddp2      train.strategy=ddp  train.devices=2 train.grad_accum=1 "$@"
run fsdp2     train.strategy=fsdp train.devices=2 train.grad_accum=1 "$@"
run fsdp2_ep2 train.strategy=fsdp train.devices=2 train.grad_accum=1 train.expert_parallel=2 "$@"

"$PY" - "$RUNS" <<'PYEOF'
import json, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

runs = Path(sys.argv[1])
rows, base = [], None
for name, label, gpus in (("gpu1", "auto (1 GPU)", 1), ("ddp2", "ddp", 2), ("fsdp2", "fsdp (FSDP2)", 2),
                          ("fsdp2_ep2", "fsdp + EP=2", 2)):
    f = runs / name / "summary.json"
    if not f.exists():
        rows.append(f"| {label} | {gpus} | failed (no summary.json) | - | - |")
        continue
    s = json.loads(f.read_text())
    acc = EventAccumulator(str(runs / name / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    first = {e.step: e.value for e in acc.Scalars("train/loss")}.get(1)
    per_gpu = s["tokens_per_s"] / gpus if s["tokens_per_s"] else None
    if name == "gpu1":
        base = per_gpu
    vs = f"{per_gpu / base:.2f}x" if (per_gpu and base) else "-"
    rows.append(f"| {label} | {gpus} | {per_gpu:,.0f} | {vs} | {first:.4f} |" if per_gpu and first is not None
                else f"| {label} | {gpus} | - | - | - |")
table = "\n".join(["| strategy | GPUs | tokens/s per GPU | vs 1 GPU | first-step loss |",
                   "|---|---|---|---|---|", *rows])
(runs / "scale.md").write_text(table + "\n")
print(table)
PYEOF
