"""Per-layer balancing state that outlives one forward: the global-batch expert
counts (aux_scope global) and the selections that the aux-loss-free bias update
consumes. Each MoE layer holds one `BalanceState` as `layer.balance`; the layer's
forward feeds it, and the step functions of experts/layers.py (the training loop's
side, collective under data parallelism) drive it:

    one optimizer step, grad_accum > 1, aux_scope global, a bias rate:

    precompute_global_counts(model, micro_batches[:-1], one_more=True)
        every layer: start_counting()     forwards now only count(counts_E, T)
        no-grad forward of each micro-batch but the last
        every layer: stop_counting()      -> (counts_E, tokens) of this rank
        one all-reduce of all layers' rows over the data-parallel group
        every layer: set_other_counts(...) the step's other micro-batches
    the last micro-batch first: its training forward sums its own counts over the
        ranks (as with grad_accum = 1) and adds the others': f^G of the whole step
    next_micro_batch(model)               every layer: that sum becomes the step counts
    each other micro-batch: forward (loss from step_counts(...)) and backward;
        every training forward: record_selections(counts_E)
    update_router_biases(model)           every layer: take_loads() -> one all-reduce
                                          -> router.update_bias
    optimizer.step()
    clear_global_counts(model)            every layer: clear_step_counts()

With grad_accum = 1 nothing is precomputed: this micro-batch's counts, which then are
the whole step's, are summed over the ranks after the forward's last layer, every
layer's in one all-reduce (`sum_rows`, from MoE.gather_aux), and each layer's loss is
formed there; a layer called alone sums its own in `step_counts`.

The running form (balance.global_counts: running) skips the pre-pass: each training
forward sums its micro-batch's counts over the ranks and adds those of the step's earlier
micro-batches (`next_micro_batch` closes one; activation checkpointing's re-run of a
forward reuses its micro-batch's sum instead of adding it twice).

Plain attributes, not buffers: DDP would broadcast rank 0's copy over them, and
none of it belongs in a checkpoint (a step never spans a save).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch

from .parallel import all_reduce_sum

Tokens = Union[int, torch.Tensor]


def count_row(counts_E: torch.Tensor, T: int) -> torch.Tensor:
    """One forward's selections per expert and its number of tokens as one row (E + 1),
    what the data-parallel ranks sum. torch.full, not a tensor from a Python list: no
    host-to-device copy."""
    return torch.cat([counts_E, torch.full((1,), T, dtype=counts_E.dtype, device=counts_E.device)])


def sum_rows(states: List["BalanceState"], rows: List[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """`step_counts` for several layers at once: their `count_row`s summed over each
    layer's `dp_group` in one all-reduce per group (one for a whole model), then each
    layer's `summed`. What MoE.gather_aux uses, so that a forward's balancing counts
    cross the ranks once, after its last layer, not once inside every layer."""
    out: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(states)
    groups: Dict[int, List[int]] = {}
    for i, st in enumerate(states):
        groups.setdefault(id(st.dp_group), []).append(i)
    for idx in groups.values():
        table = all_reduce_sum(torch.stack([rows[i] for i in idx]), states[idx[0]].dp_group)
        for i, row in zip(idx, table):
            out[i] = states[i].summed(row)
    return out


class BalanceState:
    """The balancing counts of one MoE layer between forwards (module docstring).

    `dp_group`: the data-parallel group that global counts and bias loads are summed
    over (None: the world)."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.dp_group = None
        self._counted: Optional[Tuple[torch.Tensor, int]] = None  # while counting: (counts_E, T) so far
        self._counting = False
        self._step: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # precomputed (counts_E, tokens)
        self._loads_E: Optional[torch.Tensor] = None  # selections since the last bias update
        self.running = False  # global_counts: running (set by the layer from its config)
        self._before: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the step's closed micro-batches
        self._current: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # this micro-batch, all ranks

    def reset(self) -> None:
        """Forget every count (keeps `dp_group`)."""
        self._counted, self._counting, self._step, self._loads_E = None, False, None, None
        self._before = self._current = None

    # ---------------------------------------------------- global-batch counts (f^G)

    def start_counting(self) -> None:
        """Forwards from now on only count selections (`count`); earlier step counts
        are forgotten."""
        self._step = None
        self._counting, self._counted = True, None

    @property
    def counting(self) -> bool:
        return self._counting

    def count(self, counts_E: torch.Tensor, T: int) -> None:
        """Add one forward's selections (before capacity) and its number of tokens."""
        if self._counted is None:
            self._counted = (counts_E, T)
        else:
            self._counted = (self._counted[0] + counts_E, self._counted[1] + T)

    def stop_counting(self) -> Optional[Tuple[torch.Tensor, int]]:
        """End counting; (counts_E, tokens) counted since `start_counting`, None if
        no forward ran."""
        counted, self._counting, self._counted = self._counted, False, None
        return counted

    def set_step_counts(self, counts_E: torch.Tensor, tokens: torch.Tensor) -> None:
        """The selections and tokens of the whole optimizer-step batch (all ranks, all
        micro-batches): f^G for the training forwards until `clear_step_counts`."""
        self._step = (counts_E, tokens)

    def set_other_counts(self, counts_E: torch.Tensor, tokens: torch.Tensor) -> None:
        """The selections and tokens of all the step's micro-batches but one (all ranks):
        the next training forward sums its own over `dp_group` and adds these, which is
        f^G of the whole step, and `next_micro_batch` keeps that sum as the step counts
        for the other micro-batches' forwards. Exact, with one pre-pass forward fewer."""
        self._step, self._current, self._before = None, None, (counts_E, tokens)

    def clear_step_counts(self) -> None:
        self._step = self._before = self._current = None

    @property
    def _adds(self) -> bool:
        """Whether a training forward's summed counts are added to the step's others
        (`_before`): the running form, or the forward that completes set_other_counts
        (the exact form holds others' counts only until that forward's are added)."""
        return self.running or (self._step is None and self._before is not None)

    def next_micro_batch(self) -> None:
        """The micro-batch whose counts `step_counts` summed is done. Running form: the
        next training forward adds its own to them. After set_other_counts: the step's
        counts are complete, and every later forward of the step uses them."""
        if self._current is not None:
            c = self._current
            self._before = c if self._before is None else (self._before[0] + c[0], self._before[1] + c[1])
            self._current = None
            if not self.running:  # set_other_counts' forward has completed the step's counts
                self._step = self._before

    def step_counts(self, counts_E: torch.Tensor, T: int, training: bool) -> Tuple[torch.Tensor, Tokens]:
        """(selection counts, tokens) over the optimizer-step batch, for f^G of the
        global-batch loss, given this forward's `counts_E` over `T` tokens: the
        precomputed step counts if set; else, in a training forward with gradients,
        this micro-batch's counts summed over `dp_group` (asynchronous on GPU); else
        (evaluation) the local counts, with no collective that other ranks may not
        join."""
        if self._step is not None:
            return self._step
        if self.needs_sum(training):
            return self.summed(all_reduce_sum(count_row(counts_E, T), self.dp_group))
        if training and torch.is_grad_enabled():  # a re-run of this micro-batch's forward (running form)
            return self._running_sum()
        return counts_E, T

    def needs_sum(self, training: bool) -> bool:
        """Whether a forward's counts must be summed over `dp_group` to give f^G (the
        collective of `step_counts`): a training forward with gradients, with no
        precomputed step counts, that is not activation checkpointing's re-run of a
        micro-batch the running form has already summed."""
        return (self._step is None and training and torch.is_grad_enabled()
                and not (self._adds and self._current is not None))

    def summed(self, row: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(counts, tokens) of the step from `row`, this forward's `count_row` summed
        over `dp_group`; the running form adds the step's earlier micro-batches, and the
        forward after set_other_counts the step's other micro-batches."""
        if self._adds:
            self._current = (row[:-1], row[-1])
            return self._running_sum()
        return row[:-1], row[-1]

    def _running_sum(self) -> Tuple[torch.Tensor, torch.Tensor]:
        c, b = self._current, self._before
        return c if b is None else (b[0] + c[0], b[1] + c[1])

    # ---------------------------------------------------- aux-loss-free bias loads

    def record_selections(self, counts_E: torch.Tensor) -> None:
        """Add one training forward's selections to the loads of the next bias update."""
        self._loads_E = counts_E if self._loads_E is None else self._loads_E + counts_E

    def take_loads(self, device: Union[str, torch.device]) -> torch.Tensor:
        """The selections recorded since the last call (int64 zeros on `device` when
        there were none), and forget them."""
        loads_E, self._loads_E = self._loads_E, None
        if loads_E is None:  # no training forward since the last update
            loads_E = torch.zeros(self.n_experts, dtype=torch.long, device=device)
        return loads_E
