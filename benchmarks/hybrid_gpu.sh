#!/usr/bin/env bash
# Issue 20 on one GPU: the Qwen3-Next and Gemma 4 MoE W2 proxies against their
# transformers twins. First the CUDA tests of the fla fast path (flash-linear-attention's
# chunked gated delta rule against moelab's chunked reference, and the whole tiny
# Qwen3-Next with either backend, eager and compiled), then `moelab bench --vs-hf` of
# proxies/qwen3_next_w2 (DeltaNet layers on fla when installed; transformers uses fla
# too) and proxies/gemma4_moe_w2, bf16-mixed (training's default) as the earlier field
# proxies were measured. Tables on stdout; one JSON per bench in $OUT (bench_out/);
# RECIPES=... picks the benches. Where fla refuses its backward (Hopper with Triton
# 3.4-3.7.0, fla issue 640) both sides train their DeltaNet layers on PyTorch's chunked
# rule (bench notes say so), and the fla tests check its forward only.
#
#   pip install 'moelab[fla]'   # or flash-linear-attention / fla-core
#   PYTHONPATH=/path/to/omegaconf:$PYTHONPATH bash benchmarks/hybrid_gpu.sh
set -o pipefail
source "$(dirname "$0")/_common.sh"
OUT=${OUT:-bench_out}
STEPS=${STEPS:-8}
WARMUP=${WARMUP:-3}
mkdir -p "$OUT"
gpu_line
"$PY" - <<'PYEOF'
import importlib, torch, transformers
print("torch", torch.__version__, "| transformers", transformers.__version__)
for name in ("fla", "transformers.models.qwen3_next", "transformers.models.gemma4"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'present')}")
    except Exception as exc:  # report, the benches below say what they need
        print(f"{name}: missing ({type(exc).__name__}: {exc})")
PYEOF

echo "=== CUDA tests: tests/arch/test_linear_attention_fla.py"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rfs tests/arch/test_linear_attention_fla.py || failed+=(fla_tests)

for recipe in ${RECIPES:-proxies/qwen3_next_w2 proxies/gemma4_moe_w2}; do
    name="vs_hf_$(basename "$recipe")"
    echo
    echo "=== $name: moelab bench $recipe --vs-hf"
    t0=$SECONDS
    timeout "${LIMIT:-240}" "$PY" -m lit_modules.cli bench "$recipe" --vs-hf --warmup "$WARMUP" --steps "$STEPS" \
        --save "$OUT/$name.json" || failed+=("$name")
    echo "($name took $((SECONDS - t0)) s)"
done
finish
