#!/usr/bin/env bash
# The whole test suite on a GPU machine: the CUDA-only tests run, and every other test
# runs where a user there would run it (CUDA visible). Run it before resolving an issue
# that touches model code (CI runs the same suite on a CPU under torch 2.13 and 2.11).
# CUDA_VISIBLE_DEVICES= bash benchmarks/gpu_tests.sh runs it there on the CPU alone.
#
#   bash benchmarks/gpu_tests.sh [pytest args]          # WORKERS=8 with pytest-xdist
#
# Up to 10 failed tests then run again alone (their result is printed; the exit status
# stays the first run's).
set -u
source "$(dirname "$0")/_common.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WORKERS=${WORKERS:-8}
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device', 'x', torch.cuda.device_count())"
xdist=()
# one OpenMP thread per worker: WORKERS processes of the machine's default thread count
# each would oversubscribe the cores many times over
"$PY" -c "import xdist" 2>/dev/null && { xdist=(-n "$WORKERS"); export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; }
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
"$PY" -m pytest -q -p no:cacheprovider -rfs "${xdist[@]}" "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
# A failed test runs again alone, without xdist: a worker that died under the load of
# the others ("node down") and a test that fails on its own then read apart. The exit
# status stays the first run's.
mapfile -t failed_ids < <(sed -n 's/^FAILED \([^ ]*\).*/\1/p' "$LOG" | sort -u)
if [ "$rc" -ne 0 ] && [ ${#failed_ids[@]} -gt 0 ] && [ ${#failed_ids[@]} -le 10 ]; then
    echo "=== again, alone (no xdist): ${failed_ids[*]}"
    "$PY" -m pytest -q -p no:cacheprovider -rfs -p no:xdist "${failed_ids[@]}" 2>&1 | tail -n 5
fi
exit "$rc"
