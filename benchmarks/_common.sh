# Sourced by the benchmark scripts (`source "$(dirname "$0")/_common.sh"`): the working
# directory becomes the repository root, moelab imports from this checkout, $PY is the
# Python to run ($PYTHON, else python3), and steps that fail add their names to `failed`
# for `finish` to report (exit 1) at the end (`step` runs one with its log in $RUNS).
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
failed=()

gpu_line() {  # the GPU's name and memory, one line (nothing without nvidia-smi)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
}

step() {  # step NAME COMMAND...: run it with its output in $RUNS/NAME.log, timed; a failure is noted
    local name=$1 t0=$SECONDS; shift
    echo "=== $name"
    "$@" > "$RUNS/$name.log" 2>&1 || { echo "($name failed)"; tail -n 5 "$RUNS/$name.log"; failed+=("$name"); }
    echo "($name took $((SECONDS - t0)) s)"
}

finish() {  # after the last step: name the failed steps and exit 1, if any
    [ ${#failed[@]} -eq 0 ] || { echo "FAILED: ${failed[*]}"; exit 1; }
}
