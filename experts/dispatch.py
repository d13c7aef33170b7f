"""Dispatch: (token, expert) slots -> rows sorted by expert, and back.

Every slot s = t * K + k (token t's k-th choice) becomes one row. A stable sort by
expert keeps token order within each expert, so "the first C slots of an expert" are
its earliest tokens. With a capacity C, slots past the C-th of their expert are
dropped: they move to the end, past every expert's rows, where no backend computes
them (their rows are unspecified) and the combine step ignores them.

    slots     t0:(e1,e0) t1:(e1,e2) t2:(e1,e0)          K = 2, E = 3, C = 2
    sorted    [e0: t0 t2][e1: t0 t1 t2][e2: t1]          dropless: counts_E = 2 3 1
    capacity  [e0: t0 t2][e1: t0 t1][e2: t1] | t2(e1)    counts_E = 2 2 1, 1 dropped

Shapes are static (S = T * K rows either way) and nothing here reads a device value
on the host, so the grouped path stays free of host synchronisation.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class Dispatch(NamedTuple):
    order_S: torch.Tensor  # flat slot index (t * K + k) of each row
    inverse_S: torch.Tensor  # row of each flat slot (the inverse permutation of order_S)
    token_S: torch.Tensor  # token of each row
    counts_E: torch.Tensor  # int64 rows each expert computes (after capacity)
    tokens_per_expert_E: torch.Tensor  # int64 slots routed to each expert (before capacity)
    keep_S: Optional[torch.Tensor]  # bool, row kept; None when dropless (all kept)
    n_dropped: torch.Tensor  # int64 0-dim: slots dropped by capacity


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """C = ceil(factor * T * K / E): a factor of 1 fits a perfectly balanced router."""
    return math.ceil(factor * n_tokens * top_k / n_experts)


def dispatch(ids_TK: torch.Tensor, n_experts: int, capacity: Optional[int] = None) -> Dispatch:
    """Sort the routed slots by expert; with `capacity`, drop each expert's slots past
    the first `capacity` (in token order) to the end."""
    K = ids_TK.shape[-1]
    ids_S = ids_TK.reshape(-1)
    # scatter_add, not bincount: CUDA bincount reads the max id on the host.
    tokens_per_expert_E = torch.zeros(n_experts, dtype=torch.long, device=ids_S.device)
    tokens_per_expert_E.scatter_add_(0, ids_S, torch.ones_like(ids_S))
    order_S = ids_S.argsort(stable=True)
    if capacity is None:
        n_dropped = torch.zeros((), dtype=torch.long, device=ids_S.device)
        return Dispatch(order_S, _inverse(order_S), order_S // K, tokens_per_expert_E, tokens_per_expert_E,
                        None, n_dropped)

    ids_sorted_S = ids_S[order_S]
    first_row_E = tokens_per_expert_E.cumsum(0) - tokens_per_expert_E
    rank_S = torch.arange(ids_S.numel(), device=ids_S.device) - first_row_E[ids_sorted_S]
    # dropped slots go to a virtual expert E, sorted last; the stable sort keeps the
    # kept ones by expert, then token
    key_S = torch.where(rank_S < capacity, ids_sorted_S, n_experts)
    order_S = order_S[key_S.argsort(stable=True)]
    counts_E = tokens_per_expert_E.clamp(max=capacity)
    n_kept = counts_E.sum()
    keep_S = torch.arange(ids_S.numel(), device=ids_S.device) < n_kept
    return Dispatch(order_S, _inverse(order_S), order_S // K, counts_E, tokens_per_expert_E, keep_S,
                    ids_S.numel() - n_kept)


def dispatch_local(ids_TK: torch.Tensor, n_local: int) -> Dispatch:
    """dispatch() for slots of which only ids in [0, n_local) are computed here (an
    expert-parallel rank's own experts among every rank's tokens): slots with id
    n_local, another rank's, sort last and count as dropped (keep_S False), so the
    backends and the combine skip them as they skip capacity drops. No host read."""
    K = ids_TK.shape[-1]
    ids_S = ids_TK.reshape(-1)
    counts = torch.zeros(n_local + 1, dtype=torch.long, device=ids_S.device)
    counts.scatter_add_(0, ids_S, torch.ones_like(ids_S))
    order_S = ids_S.argsort(stable=True)
    counts_E = counts[:n_local]
    keep_S = torch.arange(ids_S.numel(), device=ids_S.device) < counts_E.sum()
    return Dispatch(order_S, _inverse(order_S), order_S // K, counts_E, counts_E, keep_S, counts[n_local])


def _inverse(order_S: torch.Tensor) -> torch.Tensor:
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return inverse_S


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, as a custom Function's forward must return it: never through a
    `.to()` that changes nothing. Traced by torch 2.11's Dynamo, a forward whose
    output is such a no-op `.to()` gets exactly zero gradient from backward (the
    float32 compiled layer of issue 21; torch 2.13 is right). A real cast is fine."""
    return t if t.dtype == dtype else t.to(dtype)


def _fused_form() -> bool:
    """Which form the permute backward and the combine take. Compiled: K gathered row
    reads per token, which Inductor fuses into one kernel each. Eager: K separate
    passes cost more than one gather plus one reduction or batched matmul, so eager
    keeps those (timings of both: benchmarks/results/gpu_suite_h100.md and the README's
    Performance section). Both forms compute the same sums
    (tests/experts/test_backends.py runs the layer in each)."""
    return torch.compiler.is_compiling()


class _GatherRows(torch.autograd.Function):
    """out = src[index], where the output holds each src row `copies` times and
    inverse[n * copies + j] is the output row with copy j of src row n.

    Autograd's backward of an index is a scatter-add into src (index_put with
    accumulate). Knowing the layout, the backward gathers the copies of each row and
    sums them instead: deterministic, and cheaper than index + index_add."""

    @staticmethod
    def forward(ctx, src, index, inverse, copies: int):
        ctx.save_for_backward(inverse)
        ctx.copies, ctx.n_src = copies, src.shape[0]
        ctx.fused = _fused_form()  # decided while tracing forward, where compile is visible
        return src[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.copies == 1:
            return grad[inverse], None, None, None
        return _sum_copies(grad, inverse.view(ctx.n_src, ctx.copies), ctx.fused).to(grad.dtype), None, None, None


def _sum_copies(rows: torch.Tensor, inverse_NC: torch.Tensor, fused: bool) -> torch.Tensor:
    """out[n] = sum_j rows[inverse_NC[n, j]], summed in float32 (returned in float32,
    or float64 for float64 rows, when `fused`; the caller casts). Compiled (`fused`): C
    gathered reads per output row, one pointwise kernel (gather + .sum(1) compiles to
    a slower reduction). Eager: one gather and one reduction over the copies, cheaper
    than C separate passes."""
    n, copies = inverse_NC.shape
    if not fused:
        return rows[inverse_NC.reshape(-1)].view(n, copies, -1).sum(1)
    acc_dtype = _accumulation_dtype(rows)
    acc = rows[inverse_NC[:, 0]].to(acc_dtype)
    for j in range(1, copies):
        acc = acc + rows[inverse_NC[:, j]].to(acc_dtype)
    return acc


class _SumCopies(torch.autograd.Function):
    """The adjoint of _GatherRows: out[n] = sum_j rows[inverse[n * copies + j]], the
    `copies` rows of each output row summed (float32 accumulation, returned in the
    rows' dtype); its backward is the gather grad[index], index[r] being the output
    row that row r is summed into. Deterministic, no scatter-add."""

    @staticmethod
    def forward(ctx, rows, inverse, index, copies: int):
        ctx.save_for_backward(index)
        return _cast(_sum_copies(rows, inverse.view(-1, copies), _fused_form()), rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad[index], None, None, None


class _GatherPadded(torch.autograd.Function):
    """out = src[index], where copy j of src row n is output row slots_NC[n, j], or
    no row when slots_NC[n, j] = len(out) (rows with fewer than C copies). The
    backward sums each src row's copies in float32, C gathered reads of the output
    gradient padded with one zero row: deterministic, no scatter-add."""

    @staticmethod
    def forward(ctx, src, index, slots_NC):
        ctx.save_for_backward(slots_NC)
        return src[index]

    @staticmethod
    def backward(ctx, grad):
        (slots_NC,) = ctx.saved_tensors
        return _cast(_sum_slots(grad, slots_NC), grad.dtype), None, None


class _SumPadded(torch.autograd.Function):
    """The adjoint of _GatherPadded: out[n] = sum_j rows[slots_NC[n, j]] (float32
    accumulation, returned in the rows' dtype), absent slots (= len(rows)) adding
    nothing; its backward is the gather grad[index], index[r] being the out row that
    row r is summed into."""

    @staticmethod
    def forward(ctx, rows, slots_NC, index):
        ctx.save_for_backward(index)
        return _cast(_sum_slots(rows, slots_NC), rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad[index], None, None


def _sum_slots(rows: torch.Tensor, slots_NC: torch.Tensor) -> torch.Tensor:
    """sum_j rows[slots_NC[:, j]] in float32, a slot equal to len(rows) reading zeros."""
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])
    acc_dtype = _accumulation_dtype(rows)
    acc = padded[slots_NC[:, 0]].to(acc_dtype)
    for j in range(1, slots_NC.shape[1]):
        acc = acc + padded[slots_NC[:, j]].to(acc_dtype)
    return acc


def permute(x_TD: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """Token rows -> expert-sorted rows (each token K times). Dropped rows are zeroed
    so that whatever a backend leaves in them (grouped_mm leaves uninitialised
    memory) sends no gradient back to the tokens."""
    x_SD = _GatherRows.apply(x_TD, d.token_S, d.inverse_S, d.order_S.numel() // x_TD.shape[0])
    if d.keep_S is not None:
        x_SD = torch.where(d.keep_S[:, None], x_SD, 0.0)
    return x_SD


class _WeightedCombine(torch.autograd.Function):
    """y_t = sum_k w_tk * rows[slot_row[t, k]], accumulated in float32: the combine's
    compiled form. Written as K gathered row reads per output row, forward compiles to
    one kernel that never materialises (T, K, D) (nor keeps it for backward), and the
    rows' gradient is one gather: d rows[r] = w[slot(r)] * d y[token(r)]."""

    @staticmethod
    def forward(ctx, rows_SD, weights_TK, slot_row_TK, row_slot_S):
        ctx.save_for_backward(rows_SD, weights_TK, slot_row_TK, row_slot_S)
        acc_dtype = _accumulation_dtype(rows_SD, weights_TK)
        w = weights_TK.to(acc_dtype)
        acc = w[:, :1] * rows_SD[slot_row_TK[:, 0]].to(acc_dtype)
        for k in range(1, slot_row_TK.shape[1]):
            acc = acc + w[:, k:k + 1] * rows_SD[slot_row_TK[:, k]].to(acc_dtype)
        return _cast(acc, rows_SD.dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        # both gradients, always: in training the rows and the weights both need them
        rows_SD, weights_TK, slot_row_TK, row_slot_S = ctx.saved_tensors
        K = slot_row_TK.shape[1]
        acc_dtype = _accumulation_dtype(rows_SD, weights_TK)
        w_S = weights_TK.reshape(-1).to(acc_dtype)[row_slot_S]
        grad_rows = (w_S[:, None] * grad_TD[row_slot_S // K].to(acc_dtype)).to(rows_SD.dtype)
        g = grad_TD.to(acc_dtype)
        grad_w = torch.stack([(g * rows_SD[slot_row_TK[:, k]].to(acc_dtype)).sum(-1) for k in range(K)], dim=1)
        return grad_rows, grad_w.to(weights_TK.dtype), None, None


def row_weights(weights_TK: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """The routing weight of each sorted row (S,), differentiable; dropped rows get 0
    (where, so that whatever gradient a backend computes for them goes nowhere)."""
    w_S = _GatherRows.apply(weights_TK.reshape(-1, 1), d.order_S, d.inverse_S, 1).view(-1)
    return w_S if d.keep_S is None else torch.where(d.keep_S, w_S, 0.0)


def sum_token_rows(y_SD: torch.Tensor, d: Dispatch, n_tokens: int) -> torch.Tensor:
    """y_t = sum_k y_(t,k): the combine of rows the backend already scaled by their
    routing weights (`routed_experts`), returned in the rows' dtype. Its backward is
    one gather, and it keeps no rows for the backward (the weighted combine keeps
    all S of them to form the weights' gradient)."""
    if d.keep_S is not None:  # where, not a multiply: dropped rows may hold NaN
        y_SD = torch.where(d.keep_S[:, None], y_SD, 0.0)
    return _SumCopies.apply(y_SD, d.inverse_S, d.token_S, d.order_S.numel() // n_tokens)


def routed_experts(backend, x_TD: torch.Tensor, weights_TK: torch.Tensor, d: Dispatch, w_in, w_out, kind: str,
                   *biases: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k w_tk * expert_(t,k)(x_t) through a row backend (experts/backends.py):
    permute -> backend -> sum. The backend scales each row's activation by its routing
    weight before the down projection (`scale_S`), which is the same function (the
    projection is linear; its bias is scaled too), so the weights' gradient is a sum
    over d_expert channels inside the backend's own kernels rather than over d_model
    channels of rows the combine would have to keep."""
    y_SD = backend(permute(x_TD, d), d.counts_E, w_in, w_out, kind, *biases, scale_S=row_weights(weights_TK, d))
    return sum_token_rows(y_SD, d, x_TD.shape[0])


def combine(y_SD: torch.Tensor, weights_TK: torch.Tensor, d: Dispatch, n_tokens: int) -> torch.Tensor:
    """y_t = sum_k w_tk * y_(t,k), returned in the rows' dtype. Compiled: the K rows
    read, weighted and summed in float32 by one kernel (_WeightedCombine). Eager: the
    rows gathered to (T, K, D) and one (1 x K) @ (K x D) product per token, which the
    matmul accumulates in float32 (weights in the rows' dtype)."""
    if d.keep_S is not None:  # where, not a multiply: dropped rows may hold NaN
        y_SD = torch.where(d.keep_S[:, None], y_SD, 0.0)
    if _fused_form():
        return _WeightedCombine.apply(y_SD, weights_TK, d.inverse_S.view(n_tokens, -1), d.order_S)
    y_TKD = _GatherRows.apply(y_SD, d.inverse_S, d.order_S, 1).view(n_tokens, -1, y_SD.shape[-1])
    return torch.bmm(weights_TK.to(y_SD.dtype).unsqueeze(1), y_TKD).squeeze(1)
