"""Where a profiled GPU's time went: computing, communicating, both at once, or idle.

Reads a Chrome trace written by torch.profiler (`train.profile_steps` writes rank 0's
to <run>/profile/trace.json) and splits the window from its first to its last GPU
event into:

    compute only      some compute kernel (or copy) runs, no collective
    overlapped        a collective runs beside compute
    comm only         a collective runs and nothing else: exposed communication
    idle              no kernel at all: the GPU waits on the host (Python, launches,
                      a host sync) or on another rank

Collectives are the NCCL kernels (names starting with "nccl"); everything else on
the device is compute. Intervals of one kind are merged first, so streams running
side by side count once.

    python -m lit_modules.tools.trace_overlap runs/<run>/profile/trace.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}

Interval = Tuple[float, float]


def _merge(intervals: Iterable[Interval]) -> List[Interval]:
    out: List[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(intervals: List[Interval]) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(x: List[Interval], y: List[Interval]) -> List[Interval]:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def summarize(events: List[Dict]) -> Dict[str, float]:
    """Milliseconds of the trace window spent in each state (module docstring), the
    window itself, and the busiest kernels' names are left to the operator tables."""
    comm, compute = [], []
    for ev in events:
        if ev.get("ph") != "X" or ev.get("cat") not in DEVICE_CATEGORIES or not ev.get("dur"):
            continue
        span = (float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]))
        (comm if str(ev.get("name", "")).lower().startswith("nccl") else compute).append(span)
    comm, compute = _merge(comm), _merge(compute)
    if not comm and not compute:
        raise ValueError("the trace holds no GPU kernels; profile a CUDA run (train.profile_steps on a GPU).")
    both = _intersect(comm, compute)
    busy = _merge(comm + compute)
    window = busy[-1][1] - busy[0][0]
    ms = 1e-3  # trace times are microseconds
    return {"window_ms": window * ms,
            "compute_only_ms": (_length(compute) - _length(both)) * ms,
            "overlapped_ms": _length(both) * ms,
            "comm_only_ms": (_length(comm) - _length(both)) * ms,
            "idle_ms": (window - _length(busy)) * ms,
            "comm_ms": _length(comm) * ms}


def format_summary(s: Dict[str, float]) -> str:
    w = s["window_ms"]
    rows = [("compute only", s["compute_only_ms"]), ("compute + collective (overlapped)", s["overlapped_ms"]),
            ("collective only (exposed)", s["comm_only_ms"]), ("idle (no kernel)", s["idle_ms"])]
    lines = ["| GPU state | ms | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {v:.2f} | {100 * v / w:.1f}% |" for name, v in rows]
    lines.append(f"| window (first to last kernel) | {w:.2f} | 100% |")
    lines.append(f"\ncollectives ran {s['comm_ms']:.2f} ms in all, "
                 f"{100 * s['overlapped_ms'] / s['comm_ms']:.0f}% of it beside compute" if s["comm_ms"] else
                 "\nno collectives in the trace")
    return "\n".join(lines)


def summarize_file(path) -> Dict[str, float]:
    raw = json.loads(Path(path).read_text())
    return summarize(raw["traceEvents"] if isinstance(raw, dict) else raw)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lit_modules.tools.trace_overlap TRACE.json", file=sys.stderr)
        return 2
    print(format_summary(summarize_file(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
