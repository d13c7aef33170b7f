"""Collectives of the MoE layers; the only experts/ module that touches
torch.distributed. It knows tensors and process groups, never the model: the
functions that walk a model's MoE layers (sharding them, collecting their shards)
are in experts/layers.py, and the balancing counts of each layer in experts/balance.py.

`all_reduce_sum` is a no-op in a single process, so the model math never branches
on whether a process group exists.

Expert parallelism over a group of EP ranks (each with its own tokens):

    rank r holds experts [r * E_local, (r + 1) * E_local) of the stacked w_in / w_out
    (E_local = E / EP, a contiguous slice), routers and everything else whole.

    local tokens -> router -> dispatch (rows sorted by global expert: the rows for
    rank q are one contiguous block) -> all-to-all (uneven splits) -> rows from
    every source, re-sorted by local expert -> backend -> back to source order ->
    all-to-all back (the splits reversed) -> combine on the token's own rank.

The backward of each all-to-all is the all-to-all with the splits swapped
(`all_to_all`). The gradient of a local expert collects the contributions of every
rank's tokens; `average_shard_grads` turns it into the data-parallel mean.

`expert_parallel` is self-contained (rows sorted by expert, counts, this rank's
expert weights, a group -> rows out), so a faster exchange can replace it alone.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from .dispatch import _GatherRows, expert_capacity


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


def expert_parallel(backend: Callable, x_SD: torch.Tensor, counts_E: torch.Tensor, w_in_LID: torch.Tensor,
                    w_out_LDF: torch.Tensor, kind: str, group, *biases: torch.Tensor) -> torch.Tensor:
    """The expert backend, with the experts spread over `group`: same contract as a
    backend (rows sorted by global expert, counts_E over all E experts, rows past
    counts_E.sum() dropped and unspecified in the result), but w_in / w_out (and the
    optional biases b_in / b_out) hold only this rank's E_local = E / EP experts.

    Host syncs: the split sizes (Python ints that all_to_all_single needs), one per
    call, which breaks a compiled block's graph there; nothing else reads a device
    value on the host."""
    ep = dist.get_world_size(group)
    E_local = w_in_LID.shape[0]
    send_RL = counts_E.view(ep, E_local)  # rows for (destination rank, its local expert)
    recv_RL = torch.empty_like(send_RL)  # rows from (source rank, my local expert)
    dist.all_to_all_single(recv_RL, send_RL.contiguous(), group=group)
    # the one host sync of the layer: split sizes must be Python ints
    send = send_RL.sum(1).tolist()
    recv_table = recv_RL.tolist()
    recv = [sum(row) for row in recv_table]
    n_kept = sum(send)

    x_recv = all_to_all(x_SD[:n_kept], recv, send, group)  # source-major, expert-minor
    # re-sort to expert-major (stable: source order within an expert)
    block = torch.arange(ep * E_local, device=x_SD.device)
    block_of_row = torch.repeat_interleave(block, recv_RL.reshape(-1), output_size=sum(recv))
    key = (block_of_row % E_local) * ep + block_of_row // E_local
    order = key.argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    # permutations both ways; _GatherRows' backward is the gather by the inverse
    # permutation, not autograd's scatter-add of an index
    y_local = backend(_GatherRows.apply(x_recv, order, inverse, 1), recv_RL.sum(0), w_in_LID, w_out_LDF, kind,
                      *biases)
    y_kept = all_to_all(_GatherRows.apply(y_local, inverse, order, 1), send, recv, group)
    if n_kept == x_SD.shape[0]:
        return y_kept
    # dropped rows (capacity): zeros, which the combine step ignores anyway
    return torch.cat([y_kept, y_kept.new_zeros(x_SD.shape[0] - n_kept, y_kept.shape[1])])


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
    `experts.layers.shard_experts` makes a layer's `backend`, so that the layer's
    forward calls one expert compute whether or not it is sharded. Dropless layers
    exchange exactly their rows (`expert_parallel`, one host sync for the split
    sizes); with a capacity factor the exchange has static shapes
    (`expert_parallel_capacity`, no host sync)."""

    def __init__(self, backend: Callable, group, capacity_factor: Optional[float] = None, top_k: int = 1):
        self.backend, self.group = backend, group
        self.capacity_factor, self.top_k = capacity_factor, top_k

    def __call__(self, x_SD, counts_E, w_in_LID, w_out_LDF, kind: str, *biases) -> torch.Tensor:
        if self.capacity_factor is None:
            return expert_parallel(self.backend, x_SD, counts_E, w_in_LID, w_out_LDF, kind, self.group, *biases)
        # the capacity dispatch used: the same function on the same numbers
        capacity = expert_capacity(x_SD.shape[0] // self.top_k, self.top_k, counts_E.numel(), self.capacity_factor)
        return expert_parallel_capacity(self.backend, x_SD, counts_E, w_in_LID, w_out_LDF, kind, self.group,
                                        capacity, *biases)


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
