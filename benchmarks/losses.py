"""Print the train/loss scalars of run directories side by side, one row per step:
the quick check that layouts (strategies, expert parallel, compile) train alike.

    python benchmarks/losses.py RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def losses(run: Path) -> dict:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def main(argv) -> None:
    runs = [Path(a) for a in argv]
    table = {r.name: losses(r) for r in runs}
    steps = sorted({s for t in table.values() for s in t})
    print("| step | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{t[s]:.4f}" if s in t else "-" for t in table.values()) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
