"""Collectives of the MoE layers; the only experts/ module that touches
torch.distributed. It knows tensors and process groups, never the model: the
functions that walk a model's MoE layers (sharding them, collecting their shards)
are in experts/layers.py, and the balancing counts of each layer in experts/balance.py.

`all_reduce_sum` is a no-op in a single process, so the model math never branches
on whether a process group exists.

Expert parallelism over a group of EP ranks (each with its own tokens):

    rank r holds experts [r * E_local, (r + 1) * E_local) of the stacked w_in / w_out
    (E_local = E / EP, a contiguous slice), routers and everything else whole.

    dropless (`expert_parallel`): local tokens -> router -> each token once to every
    rank holding one of its experts (uneven all-to-all) -> that rank's experts and the
    weighted sum of their outputs -> one partial row per (token, rank) back -> summed.
    capacity (`expert_parallel_capacity`): rows sorted by expert, padded to the
    capacity -> equal-split all-to-all -> experts -> the same way back -> combine.

The backward of each all-to-all is the all-to-all with the splits swapped
(`all_to_all`). The gradient of a local expert collects the contributions of every
rank's tokens; `average_shard_grads` turns it into the data-parallel mean.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from .dispatch import (Dispatch, _GatherPadded, _SumPadded, combine, dispatch_local,
                       expert_capacity, permute, routed_experts)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum `t` over `group` (None: the default world group) and return the result.

    Works on a detached copy: the balancing counts it is used for are integers that
    carry no gradient, so a plain (non-differentiable) collective is the right tool.
    Without an initialised process group it returns `t` unchanged (no copy)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


# ------------------------------------------------------------------ expert parallel


def all_to_all(x: torch.Tensor, out_splits: Optional[List[int]] = None, in_splits: Optional[List[int]] = None,
               group=None) -> torch.Tensor:
    """Differentiable all-to-all of rows: rows of `x` split by `in_splits` go to the
    ranks of `group` in order, and the result holds `out_splits[s]` rows from each
    source s (None, None: equal splits, nothing to read on the host). Its backward is
    the same exchange with the splits swapped.

    Functional collectives, not an in-place all_to_all_single inside a custom autograd
    Function: traced by torch 2.11's Dynamo, that one gave wrong gradients (issue 21;
    torch 2.13 traced it right), and these trace correctly on both."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits,
                                      group if group is not None else dist.group.WORLD)


def _exchange_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype token rows travel in: autocast's when it is on for their device (the
    experts' first matmul casts them to it anyway, so sending float32 rows would
    double the traffic for nothing), else their own."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.is_floating_point():
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _slot_experts(d: Dispatch, T: int, K: int) -> torch.Tensor:
    """The global expert of each (token, choice) slot of a dropless dispatch: slot s
    sits in sorted row inverse_S[s], and the rows of expert e end at cumsum(counts)[e]."""
    return torch.bucketize(d.inverse_S, d.counts_E.cumsum(0), right=True).view(T, K)


def expert_parallel(backend: Callable, x_TD: torch.Tensor, weights_TK: torch.Tensor, d: Dispatch,
                    w_in_LID: torch.Tensor, w_out_LDF: torch.Tensor, kind: str, group,
                    *biases: torch.Tensor) -> torch.Tensor:
    """A dropless MoE layer's routed output y_TD = sum_k w_tk * expert_(t,k)(x_t), with
    the experts spread over `group`: w_in / w_out (and the optional biases) hold only
    this rank's E_local = E / EP experts, global experts [rank * E_local, ...).

    Token exchange, not row exchange: a token goes once to each rank holding one of
    its experts (with its local expert ids and routing weights for that rank, -1 / 0
    in the slots of other ranks), the receiving rank runs its experts and sums the
    token's weighted outputs there, and one partial row per (token, rank) comes back
    to be summed. With top-8 of 64 experts on 4 ranks a token visits 3.6 ranks on
    average instead of sending 8 rows; rows travel in autocast's dtype.

        tokens -> (token, rank) pairs, rank-major -> all-to-all -> pairs from every
        source -> K slots each, sorted by local expert -> backend (rows scaled by their
        routing weights) -> sum per pair (float32) -> all-to-all back -> sum over the
        token's ranks (float32)

    Host syncs: one per call, for the split sizes (Python ints that the all-to-all
    needs) and the number of rows this rank computes, all read in one transfer; a
    compiled block's graph breaks there. Every step is a gather or a fixed-width sum
    (no scatter-add), so the result is deterministic."""
    ep, L = group_size(group), w_in_LID.shape[0]
    T, K = weights_TK.shape
    dev = x_TD.device
    e_TK = _slot_experts(d, T, K)
    rank_TK = e_TK // L
    to_TR = torch.zeros(T, ep, dtype=torch.bool, device=dev).scatter_(1, rank_TK, True)
    send_table = torch.cat([to_TR.sum(0)[:, None], d.counts_E.view(ep, L)], 1)  # (rank, [tokens, rows per expert])
    recv_table = torch.empty_like(send_table)
    dist.all_to_all_single(recv_table, send_table.contiguous(), group=group)
    # the one host sync of the layer
    sizes = torch.cat([send_table[:, 0], recv_table.reshape(-1)]).tolist()
    send, recv_rows = sizes[:ep], sizes[ep:]
    recv = recv_rows[::L + 1]
    n_rows = sum(recv_rows) - sum(recv)
    N, M = sum(send), sum(recv)

    # (token, rank) pairs in rank-major, token-minor order: pair n is flat index
    # rank * T + token of the (rank, token) grid
    flat = (~to_TR.t().reshape(-1)).to(torch.uint8).argsort(stable=True)[:N]
    rank_N, token_N = flat // T, flat % T
    pair_of = torch.full((ep * T,), N, dtype=torch.long, device=dev)
    pair_of[flat] = torch.arange(N, device=dev)
    pairs_TR = pair_of.view(ep, T).t()  # (token, rank) -> its pair, N where none
    mine_NK = rank_TK[token_N] == rank_N[:, None]
    ids_NK = torch.where(mine_NK, e_TK[token_N] % L, -1)
    w_NK = torch.where(mine_NK, weights_TK[token_N], 0.0)

    x_N = _GatherPadded.apply(x_TD, token_N, pairs_TR).to(_exchange_dtype(x_TD))
    x_M = all_to_all(x_N, recv, send, group)
    # routing weights (differentiable) and local ids (exact in float32) in one exchange
    meta = all_to_all(torch.cat([w_NK.float(), ids_NK.float()], 1), recv, send, group)
    w_MK, ids_MK = meta[:, :K], meta[:, K:].detach().long()

    # the received slots sorted by local expert (stable: source, then token order)
    key = torch.where(ids_MK >= 0, ids_MK, L).reshape(-1)
    slot_R = key.argsort(stable=True)[:n_rows]
    row_of = torch.full((M * K,), n_rows, dtype=torch.long, device=dev)
    row_of[slot_R] = torch.arange(n_rows, device=dev)
    rows_MK = row_of.view(M, K)  # (pair, slot) -> its row, n_rows where empty
    counts_L = recv_table[:, 1:].sum(0)
    pair_R = slot_R // K
    # each row scaled by its routing weight inside the backend (before the down
    # projection, as in the layer: experts.dispatch.routed_experts), then each pair's
    # rows summed; empty slots (row n_rows) add nothing
    y_R = backend(_GatherPadded.apply(x_M, pair_R, rows_MK), counts_L, w_in_LID, w_out_LDF, kind, *biases,
                  scale_S=_GatherPadded.apply(w_MK.reshape(-1, 1), slot_R, rows_MK.reshape(-1, 1)).view(-1))
    y_M = _SumPadded.apply(y_R, rows_MK, pair_R)
    y_N = all_to_all(y_M, send, recv, group)
    return _SumPadded.apply(y_N, pairs_TR, token_N)


def expert_parallel_gather(backend: Callable, x_TD: torch.Tensor, weights_TK: torch.Tensor, d: Dispatch,
                           w_in_LID: torch.Tensor, w_out_LDF: torch.Tensor, kind: str, group,
                           *biases: torch.Tensor) -> torch.Tensor:
    """`expert_parallel` with static shapes: no host read, so the layer compiles into one
    graph with its block (train.ep_dispatch = allgather; Megatron's all-gather token
    dispatcher). Every rank receives the tokens of its whole EP group with their
    routing, runs its own experts on the slots that chose them (the others count as
    dropped), and the partial outputs go back to their tokens' ranks to be summed:

        tokens (T) -> all-gather (EP x T, in autocast's dtype) -> local dispatch -> backend
        (+ combine) -> partial rows (EP x T, compute dtype) -> to their ranks -> float32
        sum over ranks

    Traffic: every token to every rank of the group, where the token exchange sends it
    only to the ranks holding its experts (3.6 of 4 for top-8 of 64: close). Memory:
    a backend with a `fused` entry (triton) gathers the token rows itself; another one
    gets the EP x T x K slot rows materialised, K x the gathered tokens, dropped rows
    included. Both collectives are equal-split all-to-alls (an all-gather is an
    all-to-all of EP copies, a reduce-scatter an all-to-all and a float32 sum), which
    trace correctly and run on gloo too."""
    ep, rank, L = group_size(group), group_rank(group), w_in_LID.shape[0]
    T, K = weights_TK.shape
    D = x_TD.shape[1]
    e_TK = _slot_experts(d, T, K)
    x_all = all_to_all(x_TD.to(_exchange_dtype(x_TD)).expand(ep, T, D).reshape(ep * T, D), group=group)
    # routing weights and expert ids in one exchange (ids < 2^24: exact in float32)
    meta = torch.cat([weights_TK.float(), e_TK.float()], 1)
    meta_all = all_to_all(meta.expand(ep, T, 2 * K).reshape(ep * T, 2 * K), group=group)
    w_all = meta_all[:, :K]
    with torch.no_grad():
        e_all = meta_all[:, K:].long()
        local = torch.where(e_all // L == rank, e_all % L, L)
    dl = dispatch_local(local, L)
    fused = getattr(backend, "fused", None)
    if fused is not None:
        y_all = fused(x_all, w_all, dl, w_in_LID, w_out_LDF, kind, *biases)
    else:
        y_all = routed_experts(backend, x_all, w_all, dl, w_in_LID, w_out_LDF, kind, *biases)
    # partial outputs to their tokens' ranks in the rows' dtype (the backends return the
    # compute dtype: sending them as float32 would double the largest exchange for the
    # same values), summed in float32 (a reduce-scatter)
    return all_to_all(y_all, group=group).view(ep, T, -1).sum(0, dtype=torch.float32)


def expert_parallel_capacity(backend: Callable, x_SD: torch.Tensor, counts_E: torch.Tensor,
                             w_in_LID: torch.Tensor, w_out_LDF: torch.Tensor, kind: str, group,
                             capacity: int, *biases: torch.Tensor) -> torch.Tensor:
    """`expert_parallel` for capacity-bounded dispatch, with static shapes: no host
    sync, and the whole exchange compiles with the block.

    Every expert keeps at most `capacity` rows (dispatch with that capacity), so each
    expert's rows are padded to exactly `capacity`: every rank sends E_local x C rows to
    every rank, equal splits known without reading the counts. Each local expert
    computes its EP x C rows (padding rows are zeros, and their outputs are never
    read), and the same exchange brings the outputs back.

        sorted rows -> (E, C, D) = (ep, E_local, C, D) -> all-to-all -> (ep_src, E_local, C, D)
        -> (E_local, ep_src x C, D) -> backend -> the same way back -> sorted rows

    Traffic and expert compute are those of E x C rows per rank (capacity_factor x
    the routed rows), the price of static shapes. Every rank must use the same
    capacity, i.e. the same number of tokens per micro-batch (training batches are)."""
    ep = group_size(group)
    S, D = x_SD.shape
    E, C = counts_E.numel(), capacity
    L = E // ep
    dev = x_SD.device
    first_E = counts_E.cumsum(0) - counts_E
    slot_C = torch.arange(C, device=dev)
    # padded slot (e, c) holds sorted row first_E[e] + c, or the zero row S past the expert's rows
    src_EC = torch.where(slot_C < counts_E[:, None], first_E[:, None] + slot_C, S)
    x_pad = torch.cat([x_SD, x_SD.new_zeros(1, D)])[src_EC.reshape(-1)]
    x_recv = all_to_all(x_pad, group=group)  # (ep_src, L, C, D), flat
    x_local = x_recv.view(ep, L, C, D).transpose(0, 1).reshape(L * ep * C, D)
    rows_L = torch.full((L,), ep * C, dtype=counts_E.dtype, device=dev)
    y_local = backend(x_local, rows_L, w_in_LID, w_out_LDF, kind, *biases)
    y_pad = all_to_all(y_local.view(L, ep, C, -1).transpose(0, 1).reshape(E * C, -1), group=group)
    # sorted row r of expert e is slot r - first_E[e]; dropped rows (past the kept ones)
    # read some slot: their values are unspecified, as the backend contract allows
    row_S = torch.arange(S, device=dev)
    e_S = torch.bucketize(row_S, counts_E.cumsum(0), right=True).clamp(max=E - 1)
    return y_pad[e_S * C + (row_S - first_E[e_S]).clamp(0, C - 1)]


class ExpertParallel:
    """An expert backend with the experts spread over `group`: what
    `experts.layers.shard_experts` makes a layer's `backend`. It has the `fused` entry
    of a backend (the MoE layer hands it the token rows, routing weights and dispatch,
    and gets the combined output), so the layer's forward is the same whether or not
    its experts are sharded. Dropless layers exchange tokens (`dispatch` alltoall:
    `expert_parallel`, one host sync; allgather: `expert_parallel_gather`, static
    shapes); with a capacity factor the exchange has static shapes
    (`expert_parallel_capacity`, no host sync). `backend` computes the local experts'
    rows."""

    def __init__(self, backend: Callable, group, capacity_factor: Optional[float] = None, top_k: int = 1,
                 dispatch: str = "alltoall"):
        self.backend, self.group = backend, group
        self.capacity_factor, self.top_k = capacity_factor, top_k
        self.exchange = {"alltoall": expert_parallel, "allgather": expert_parallel_gather}[dispatch]

    def fused(self, x_TD, weights_TK, d: Dispatch, w_in_LID, w_out_LDF, kind: str, *biases) -> torch.Tensor:
        if d.keep_S is None:
            return self.exchange(self.backend, x_TD, weights_TK, d, w_in_LID, w_out_LDF, kind, self.group, *biases)
        # the capacity dispatch used: the same function on the same numbers
        capacity = expert_capacity(x_TD.shape[0], self.top_k, d.counts_E.numel(), self.capacity_factor)
        y_SD = expert_parallel_capacity(self.backend, permute(x_TD, d), d.counts_E, w_in_LID, w_out_LDF, kind,
                                        self.group, capacity, *biases)
        return combine(y_SD, weights_TK, d, x_TD.shape[0])


def group_rank(group) -> int:
    """This process's rank in `group` (None: the world)."""
    return dist.get_rank(group)


def group_size(group) -> int:
    """The number of ranks in `group` (None: the world)."""
    return dist.get_world_size(group)


@torch.no_grad()
def average_shard_grads(shards: List[torch.Tensor], world_size: int, group=None) -> None:
    """Turn each expert shard's gradient into the data-parallel mean, as DDP does for
    the replicated weights: the all-to-all backward already summed the contributions
    of the EP group's tokens; `group` (expert-data-parallel: ranks holding the same
    shard, None when EP covers the world) sums the rest, and the result is divided
    by the number of ranks with their own data (`world_size`)."""
    for p in shards:
        if p.grad is None:
            continue
        if group is not None:
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(world_size)


@torch.no_grad()
def gather_expert_shard(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather a tensor sharded along dim 0 over `group` (ranks in order)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)
