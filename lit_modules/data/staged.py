"""Batches of a run with train.stages (arch/stages.py): each stage its own windows
(seq_len + 1 tokens) and batch size, and the batch of every optimizer step a function
of the step alone:

    step u in stage k, j = u - start_k:   epoch j // E_k, batch j % E_k of stage k's
                                          order (E_k: stage k's batches per epoch)

Stage 0's order is that of a run without stages (seeded by (seed, epoch)); a later
stage draws its own permutation of its windows (seeded by (seed, epoch, k)), so it
starts a fresh pass over the data, in windows of its own length. With data.mix a
stage's order is its mixture's (lit_modules/data/mix.py: slots of the stage, drawn by
the stage's weights), and the same arithmetic places a step in it.

A resumed run needs nothing but its step, and the prefetched batch of a step is
right whatever stage the model is in when it is fetched.
"""
from __future__ import annotations

import bisect
from typing import Callable, Iterator, List, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info


class StagedBatches(IterableDataset):
    """Training batches from global step `start_step` on, through every stage (the
    last stage's order goes on past its end). `segments[k]` is stage k's
    `_TrainBatches` of lit_modules.data.datamodule. With DataLoader workers, worker
    i makes steps start + i, start + i + n, ... (the loader puts them back in order)."""

    def __init__(self, segments: Sequence, starts: Sequence[int]):
        self.segments, self.starts = list(segments), list(starts)
        self.start_step = 0

    def locate(self, step: int):
        """(segment, epoch, batch within the epoch) of global step `step`."""
        k = max(bisect.bisect_right(self.starts, step) - 1, 0)
        seg, j = self.segments[k], step - self.starts[k]
        return k, seg, j // seg.batches_per_epoch, j % seg.batches_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        orders = {}  # (stage, epoch) -> permutation; only the current one is kept
        step = self.start_step + worker
        while True:
            k, seg, epoch, b = self.locate(step)
            if (k, epoch) not in orders:
                orders = {(k, epoch): seg.order(epoch)}
            yield seg.windows.batch(seg.batch_ids(orders[(k, epoch)], b))
            step += n


class StagedValBatches(IterableDataset):
    """The validation batches of the stage the model is in when validation starts
    (`current()` gives its index): each stage's own fixed set, of its seq_len."""

    def __init__(self, per_stage: List, current: Callable[[], int]):
        self.per_stage, self.current = per_stage, current

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.per_stage[self.current()])
