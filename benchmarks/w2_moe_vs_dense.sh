#!/usr/bin/env bash
# W2 (../shared/reference/performance.md): the Qwen3-MoE proxy and its dense twin with
# the same active parameters, trained by `moelab train` on the same tokens for the same
# steps, then compared (validation loss/perplexity, tokens/s, MFU). One GPU, bf16-mixed.
#
#   bash benchmarks/w2_moe_vs_dense.sh [a.b=c ...]     # overrides go to both runs
#
# Data: the embedded corpus (this Python's standard library, ~10M characters) plus the
# installed torch package's Python sources, capped at 40M characters (~10M tokens with
# the 32K BPE): the 600 steps of 8 x 2048 tokens then see each token about once.
# DATA='stdlib' restricts it to the standard library alone (about 4 epochs then).
# The BPE and the token cache are made by the first run and reused by the second.
# Each model takes about 2-3 minutes on one H100 (600 steps, validation every 200,
# blocks compiled: seen at 150 steps without compile, MoE 107k and dense 200k tokens/s;
# at 100 steps with compile, MoE 213k tokens/s).
# Runs land in $RUNS (default runs/w2-<time>); a table is printed at the end and
# written to $RUNS/compare.md.
set -u
source "$(dirname "$0")/_common.sh"
RUNS=${RUNS:-runs/w2-$(date +%Y%m%d-%H%M%S)}
TORCH_SRC=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
DATA=${DATA:-"[stdlib,'$TORCH_SRC/**/*.py']"}
MAX_CHARS=${MAX_CHARS:-40000000}

for model in qwen3_moe_w2 dense_w2; do
    echo "=== moelab train proxies/$model"
    t0=$SECONDS
    "$PY" -m lit_modules.cli train "proxies/$model" "train.run_dir=$RUNS" "train.run_name=$model" \
        "data.source=$DATA" "data.max_chars=$MAX_CHARS" "$@" || echo "($model failed)"
    echo "($model took $((SECONDS - t0)) s)"
done

"$PY" - "$RUNS" <<'EOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
rows = []
for name in ("qwen3_moe_w2", "dense_w2"):
    f = runs / name / "summary.json"
    if not f.exists():
        rows.append(f"| {name} | failed (no summary.json) |||||||")
        continue
    s = json.loads(f.read_text())
    mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") else "-"
    rows.append(f"| {name} | {s['params_total'] / 1e6:.1f}M | {s['params_active'] / 1e6:.1f}M | {s['steps']} "
                f"| {s['tokens'] / 1e6:.2f}M | {s['val_loss']:.4f} | {s['val_ppl']:.2f} "
                f"| {s['tokens_per_s']:,.0f} | {mfu} |")
table = "\n".join(["| model | params | active | steps | tokens | val loss | val ppl | tokens/s | MFU |",
                   "|---|---|---|---|---|---|---|---|---|", *rows])
print(table)
(runs / "compare.md").write_text(table + "\n")
EOF
