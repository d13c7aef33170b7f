#!/usr/bin/env bash
# Scale-out on one host with any number of GPUs, through `moelab train` (compiled blocks,
# bf16-mixed), each run $STEPS optimizer steps; the first logging interval (start-up,
# compilation) is left out of tokens/s.
#
#   weak     the W2 proxy (proxies/qwen3_moe_w2) at micro-batch M per GPU for each M in
#            $MICROS: ddp / fsdp (FSDP2) / fsdp + EP=N on N GPUs (the 1-GPU rows: `single`). Same
#            micro-batch per GPU as the 1-GPU row, so "vs 1 GPU" is weak-scaling
#            efficiency; the 1-GPU micro-8 batch split over 4 GPUs is the micro-2 row
#            (strong scaling: its total tokens/s over the 1-GPU micro-8 row).
#   fsdp     the fsdp rows of `weak` alone (ep: the fsdp + EP rows)
#   experts  W2 with $MANY experts of width 256 (top-8): fsdp against fsdp + EP=N
#   large    proxies/qwen3_moe_4gpu (10.7B parameters, does not fit one H100): fsdp + EP=N
#   ckpt     W2 fsdp + EP=N writing a full, then a sharded checkpoint at step 5, each resumed for a
#            step: save and load seconds (CKPT_FORMATS="full" or "sharded": one of them)
#   profile  W2 at micro 8 under fsdp and under fsdp + EP=N, 8 steps each, torch.profiler over
#            steps 6-7 (operator tables per rank and rank 0's trace in
#            $RUNS/profile_fsdp/profile and $RUNS/profile_ep/profile; no table rows)
#
#   ddp      the ddp rows of `weak` alone (GRAPHS=1: each also under train.compile=graphs)
#   single   the 1-GPU rows of `weak`, one per micro-batch size, side by side on GPUs 0, 1, ...
#            (or on the GPUs listed in SINGLE_GPUS); GRAPHS=1 adds each under train.compile=graphs
#            (the compiled blocks replayed as CUDA graphs) on the next GPU
#   capacity W2 with capacity factor 1.25 (the static-shape exchange): fsdp against fsdp + EP=N
#   allgather W2 fsdp + EP=N with train.ep_dispatch=allgather (static shapes, no host read),
#            with the grouped_mm and the triton expert backends, at each micro-batch of $MICROS
#
#   NGPU=4 SETS="single weak experts large" bash benchmarks/scale.sh [a.b=c ...]   # overrides go to every run
#   TAG=_g NOTE=", CUDA graphs" SETS=ddp bash benchmarks/scale.sh train.compile=graphs   # tagged rows
#
# Several invocations with the same RUNS add their rows to one table (SETS="" prints it).
#
# The table (tokens/s per GPU, MFU against the dense bf16 datasheet peak, peak memory of
# rank 0, the loss at the first logged step (step 5: the same in every layout up to
# bf16 rounding), checkpoint save and load seconds) is printed last and written to
# $RUNS/scale.md, with each fsdp + EP row's speed over its fsdp twin's (issue 17's EP
# target) under it; each run's summary.json stays under $RUNS. Checkpoints are deleted after
# each run (W2 with AdamW: 5.9 GB).
set -u
source "$(dirname "$0")/_common.sh"
# NVLink multicast stays off on shared machines
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
RUNS=${RUNS:-runs/scale-$(date +%Y%m%d-%H%M%S)}
STEPS=${STEPS:-25}
MICROS=${MICROS:-"8 2"}
MANY=${MANY:-256}
SETS=${SETS-"single weak experts capacity large ckpt"}  # SETS="": only print the table of $RUNS
LIMIT=${LIMIT:-300}   # seconds per run
# runs with other overrides beside the plain ones in one table: TAG is added to the run
# names, NOTE to the labels (TAG=_bf16 NOTE=", bf16 gradients" ... train.grad_reduce_dtype=bf16)
TAG=${TAG:-}
NOTE=${NOTE:-}
W2=proxies/qwen3_moe_w2
COMMON=("train.run_dir=$RUNS" "train.max_steps=$STEPS" "train.log_every=5" "train.val_every=0"
        "train.ckpt_every=-1" "train.compile=true" "train.seq_len=2048" "train.grad_accum=1"
        "data.source=stdlib" "data.max_chars=4000000")
[ "$NGPU" -ge 2 ] || { echo "scale.sh needs at least 2 GPUs (found $NGPU)"; exit 1; }
mkdir -p "$RUNS"
: >> "$RUNS/rows.tsv"

run() {  # name, label, gpus, micro, recipe, extra overrides... (KEEP_CKPT=1: keep its checkpoints; NO_ROW=1: no table row)
    local name=$1$TAG label=$2$NOTE gpus=$3 micro=$4 recipe=$5; shift 5
    echo "=== $name: moelab train $recipe micro $micro on $gpus GPU(s) $*"
    local t0=$SECONDS
    # -k: a rank stuck in a collective ignores SIGTERM; then the launcher's children go too
    timeout -k 20 "$LIMIT" "$PY" -m lit_modules.cli train "$recipe" "${COMMON[@]}" "train.run_name=$name" \
        "train.micro_batch_size=$micro" "train.devices=$gpus" "$@" > "$RUNS/$name.log" 2>&1 \
        || { echo "($name failed:"; tail -5 "$RUNS/$name.log"; echo ")"; pkill -9 -f "train.run_name=$name" 2>/dev/null; }
    [ -n "${KEEP_CKPT:-}" ] || rm -rf "$RUNS/$name/checkpoints"
    [ -n "${NO_ROW:-}" ] || printf '%s\t%s\t%s\t%s\n' "$name" "$label" "$gpus" "$micro" >> "$RUNS/rows.tsv"
    echo "($name took $((SECONDS - t0)) s)"
}

N=$NGPU
for set in $SETS; do
    case $set in
    single)  # the 1-GPU rows, one GPU each, side by side (separate GPUs: no interference)
        gpus=(${SINGLE_GPUS:-$(seq 0 $((N - 1)))})
        i=0
        for m in $MICROS; do
            CUDA_VISIBLE_DEVICES=${gpus[$i]} run "gpu1_m$m" "1 GPU" 1 "$m" $W2 train.strategy=auto "$@" &
            i=$((i + 1))
            if [ -n "${GRAPHS:-}" ]; then  # and the same row with the blocks replayed as CUDA graphs
                CUDA_VISIBLE_DEVICES=${gpus[$i]} run "gpu1g_m$m" "1 GPU, CUDA graphs" 1 "$m" $W2 \
                    train.strategy=auto train.compile=graphs "$@" &
                i=$((i + 1))
            fi
        done
        wait ;;
    weak)
        for m in $MICROS; do
            run "ddp_m$m" "ddp" "$N" "$m" $W2 train.strategy=ddp "$@"
            run "fsdp_m$m" "fsdp" "$N" "$m" $W2 train.strategy=fsdp "$@"
            run "fsdp_ep_m$m" "fsdp + EP=$N" "$N" "$m" $W2 train.strategy=fsdp "train.expert_parallel=$N" \
                "$@"
        done ;;
    fsdp)  # the fsdp rows of `weak` alone (a same-machine baseline for other sets)
        for m in $MICROS; do run "fsdp_m$m" "fsdp" "$N" "$m" $W2 train.strategy=fsdp "$@"; done ;;
    ddp)  # the ddp rows of `weak` alone; GRAPHS=1 adds each under train.compile=graphs (no DDP
          # wrapper: train.grad_sync=step), compared with the 1-GPU graphs row of `single`
        for m in $MICROS; do
            run "ddp_m$m" "ddp" "$N" "$m" $W2 train.strategy=ddp "$@"
            [ -z "${GRAPHS:-}" ] || run "ddpg_m$m" "ddp, CUDA graphs" "$N" "$m" $W2 train.strategy=ddp \
                train.compile=graphs "$@"
        done ;;
    ep)  # the fsdp + EP rows of `weak` alone
        for m in $MICROS; do
            run "fsdp_ep_m$m" "fsdp + EP=$N" "$N" "$m" $W2 train.strategy=fsdp "train.expert_parallel=$N" "$@"
        done ;;
    experts)
        run "fsdp_e$MANY" "fsdp, $MANY experts" "$N" 2 $W2 train.strategy=fsdp "model.moe.n_experts=$MANY" "$@"
        run "fsdp_ep_e$MANY" "fsdp + EP=$N, $MANY experts" "$N" 2 $W2 train.strategy=fsdp \
            "model.moe.n_experts=$MANY" "train.expert_parallel=$N" "$@" ;;
    capacity)  # capacity factor 1.25: the static-shape expert-parallel exchange (no host sync)
        run "fsdp_cf" "fsdp, capacity 1.25" "$N" 2 $W2 train.strategy=fsdp model.moe.capacity_factor=1.25 "$@"
        run "fsdp_ep_cf" "fsdp + EP=$N, capacity 1.25" "$N" 2 $W2 train.strategy=fsdp \
            model.moe.capacity_factor=1.25 "train.expert_parallel=$N" "$@" ;;
    allgather)
        for m in $MICROS; do
            run "fsdp_epag_m$m" "fsdp + EP=$N, allgather" "$N" "$m" $W2 train.strategy=fsdp "train.expert_parallel=$N" \
                train.ep_dispatch=allgather "$@"
            run "fsdp_epag_tr_m$m" "fsdp + EP=$N, allgather, triton" "$N" "$m" $W2 train.strategy=fsdp \
                "train.expert_parallel=$N" train.ep_dispatch=allgather model.moe.backend=triton "$@"
        done ;;
    large)
        run "large_fsdp_ep" "qwen3_moe_4gpu, fsdp + EP=$N" "$N" 4 proxies/qwen3_moe_4gpu train.strategy=fsdp \
            "train.expert_parallel=$N" "$@" ;;
    ckpt)  # each format of $CKPT_FORMATS saved at step 5, then resumed for one step (its load time)
        for fmt in ${CKPT_FORMATS:-full sharded}; do
            KEEP_CKPT=1 run "ckpt_$fmt" "W2 fsdp + EP=$N, $fmt checkpoint, save" \
                "$N" 2 $W2 train.strategy=fsdp "train.expert_parallel=$N" "train.max_steps=5" "train.ckpt_every=0" \
                "train.checkpoint_format=$fmt" "$@"
            run "ckpt_${fmt}_load" "W2 fsdp + EP=$N, $fmt checkpoint, resumed" "$N" 2 $W2 train.strategy=fsdp \
                "train.expert_parallel=$N" "train.max_steps=6" "train.ckpt_every=-1" "train.checkpoint_format=$fmt" \
                "train.resume=$RUNS/ckpt_$fmt" "$@"
            rm -rf "$RUNS/ckpt_$fmt/checkpoints"
        done ;;
    profile)  # where fsdp loses against one GPU, and fsdp + EP against fsdp; a profiled run's speed is no row
        NO_ROW=1 run "profile_fsdp" "W2 fsdp, profiled" "$N" 8 $W2 train.strategy=fsdp "train.max_steps=8" \
            "train.profile_steps=2" "$@"
        NO_ROW=1 run "profile_ep" "W2 fsdp + EP=$N, profiled" "$N" 8 $W2 train.strategy=fsdp \
            "train.expert_parallel=$N" "train.max_steps=8" "train.profile_steps=2" "$@" ;;
    esac
done

"$PY" - "$RUNS" <<'PYEOF'
import csv, json, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

runs = Path(sys.argv[1])
rows = list(csv.reader(open(runs / "rows.tsv"), delimiter="\t"))
summaries = {}
for name, *_ in rows:
    f = runs / name / "summary.json"
    summaries[name] = json.loads(f.read_text()) if f.exists() else None
out = ["| layout | GPUs | micro / GPU | tokens/s per GPU | vs 1 GPU, same micro | MFU | peak GiB (rank 0) "
       "| loss at the first logged step | checkpoint save s | load s |", "|---|---|---|---|---|---|---|---|---|---|"]
for name, label, gpus, micro in rows:
    s = summaries[name]
    if s is None or not s.get("tokens_per_s"):
        out.append(f"| {label} | {gpus} | {micro} | failed (see {name}.log) | | | | | | |")
        continue
    per_gpu = s["tokens_per_s"] / int(gpus)
    # a CUDA-graphs row against the 1-GPU graphs row when there is one
    base = (summaries.get(f"gpu1g_m{micro}") if "CUDA graphs" in label else None) or summaries.get(f"gpu1_m{micro}")
    vs = f"{per_gpu / base['tokens_per_s']:.2f}x" if base and base.get("tokens_per_s") and int(gpus) > 1 else "-"
    acc = EventAccumulator(str(runs / name / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = sorted((e.step, e.value) for e in acc.Scalars("train/loss")) if "train/loss" in acc.Tags()["scalars"] else []
    first = logged[0][1] if logged else None
    mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") else "-"
    peak = f"{s['peak_memory_gib']:.1f}" if s.get("peak_memory_gib") else "-"
    ck = f"{s['checkpoint_seconds']:.1f}" if s.get("checkpoint_seconds") else "-"
    ld = f"{s['checkpoint_load_seconds']:.1f}" if s.get("checkpoint_load_seconds") else "-"
    speed = f"{per_gpu:,.0f}"
    if name.startswith("ckpt_"):  # a few steps with start-up: its seconds are its figures, not its speed
        speed, vs, mfu = "(checkpoint run)", "-", "-"
    out.append(f"| {label} | {gpus} | {micro} | {speed} | {vs} | {mfu} | {peak} | "
               f"{first if first is None else format(first, '.4f')} | {ck} | {ld} |")
# issue 17's EP target is against fsdp on the same machine: each fsdp + EP row over its fsdp twin
tokens = {name: s["tokens_per_s"] for name, s in summaries.items() if s and s.get("tokens_per_s")}
twins = [f"{label}, micro {micro}: {tokens[name] / tokens[name.replace('fsdp_ep_', 'fsdp_', 1)]:.2f}x"
         for name, label, _, micro in rows
         if name.startswith("fsdp_ep_") and name in tokens and name.replace("fsdp_ep_", "fsdp_", 1) in tokens]
if twins:
    out += ["", "fsdp + EP against fsdp (same micro-batch and experts): " + "; ".join(twins)]
table = "\n".join(out)
(runs / "scale.md").write_text(table + "\n")
print(table)
PYEOF
