"""Which lines make the host wait for the GPU during `moelab train` steps.

    python benchmarks/host_syncs.py OUT RECIPE [overrides ...]

Trains RECIPE with the overrides (any strategy: Lightning re-runs this script once per
rank) and, over steps START + 1 .. START + N, turns on
torch.cuda.set_sync_debug_mode("warn"): every operation that makes the host wait for
the device (a tensor read on the host, a copy from pageable memory, ...) warns, and
each warning's stack (moelab, Lightning and torch frames, innermost first) is counted.
OUT/syncs_rank<r>.txt lists them per step, most frequent first. A line that shows up
only at logging steps (train.log_every) costs once per interval; one at every step
drains the queue every step, and under several processes walks the ranks in lockstep.
Collectives that block the host (a barrier) are not operations torch flags, and not
listed. Without CUDA nothing is flagged and the files say so (a dry run).
"""
from __future__ import annotations

import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_modules.train.run import train  # noqa: E402

START, N = 8, 3
FRAMES = ("/lit_modules/", "/arch/", "/experts/", "lightning", "torch/")


class SyncFinder(Callback):
    """Counts the host syncs of steps START + 1 .. START + N by their stacks."""

    def __init__(self, out: Path, start: int = START, steps: int = N):
        self.out, self.start, self.steps = Path(out), start, steps
        self.seen: collections.Counter = collections.Counter()
        self.on, self._show = False, None

    def _record(self, message, category, filename, lineno, file=None, line=None):
        # torch's warning for a synchronizing operation (not the one that calls the mode a prototype)
        if "called a synchronizing CUDA operation" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if any(k in f.filename for k in FRAMES)
                  and "warnings" not in f.filename]
        self.seen[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start and not self.on:
            self.on, self._show = True, warnings.showwarning
            warnings.showwarning = self._record
            warnings.simplefilter("always")
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.on and trainer.global_step >= self.start + self.steps:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning, self.on = self._show, False
            self.out.mkdir(parents=True, exist_ok=True)
            lines = [f"# rank {trainer.global_rank}: host syncs in steps {self.start + 1}-{self.start + self.steps}"
                     f" ({'CUDA' if torch.cuda.is_available() else 'no CUDA: nothing is flagged'})"]
            lines += [f"{n / self.steps:5.1f}/step  {k}" for k, n in self.seen.most_common()]
            (self.out / f"syncs_rank{trainer.global_rank}.txt").write_text("\n".join(lines) + "\n")


def main(argv) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    out, recipe, *overrides = argv
    train(recipe, [f"train.max_steps={START + N + 1}", *overrides], callbacks=[SyncFinder(Path(out))])


if __name__ == "__main__":
    main(sys.argv[1:])
