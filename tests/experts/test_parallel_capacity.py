"""The static-shape expert-parallel exchange for capacity-bounded layers
(experts/parallel.py expert_parallel_capacity) on two gloo processes: the same rows,
outputs and gradients as the whole experts in one process (expert gradients summed
over the ranks), including an expert group that receives nothing, and it traces into
one graph (no host sync, no graph break)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import spawn_gloo
from experts.backends import EXPERT_BACKEND
from experts.dispatch import dispatch, expert_capacity
from experts.parallel import expert_parallel_capacity

E, K, T, D, F, WORLD = 8, 2, 12, 16, 8, 2


def _equal_rows_backend(x_SD, counts_E, w_in_LID, w_out_LDF, kind):
    """A backend for equal rows per expert (what the static exchange hands over), as
    two batched matmuls: traceable without any host read."""
    L = w_in_LID.shape[0]
    h = torch.bmm(x_SD.view(L, -1, x_SD.shape[-1]), w_in_LID.transpose(1, 2))
    gate, up = h.chunk(2, dim=-1)
    return torch.bmm(torch.nn.functional.silu(gate) * up, w_out_LDF.transpose(1, 2)).reshape(x_SD.shape[0], -1)


def _case(rank, skew):
    gen = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, E, (T, K), generator=gen)
    ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, E - 1, (T,), generator=gen)) % E  # two distinct experts
    if skew:  # every token picks rank 0's experts: rank 1's experts receive nothing
        ids = ids % (E // WORLD)
        ids[:, 1] = (ids[:, 0] + 1) % (E // WORLD)
    C = expert_capacity(T, K, E, 1.0)
    d = dispatch(ids, E, C)
    x = torch.randn(T * K, D, generator=gen)
    gen_w = torch.Generator().manual_seed(99)
    w_in, w_out = torch.randn(E, 2 * F, D, generator=gen_w), torch.randn(E, D, F, generator=gen_w)
    return d, C, x, w_in, w_out


def _local(t, rank):
    L = E // WORLD
    return t[rank * L:(rank + 1) * L]


def _run(fn, x, w_in, w_out, n_kept):
    x, w_in, w_out = (t.clone().requires_grad_() for t in (x, w_in, w_out))
    y = fn(x, w_in, w_out)[:n_kept]
    (y * torch.arange(1.0, n_kept + 1)[:, None]).sum().backward()
    return [y.detach(), x.grad, w_in.grad, w_out.grad]


def _worker(rank, out):
    loop = EXPERT_BACKEND.get("loop")
    for skew in (False, True):
        d, C, x, w_in, w_out = _case(rank, skew)
        n_kept = int(d.counts_E.sum())
        # every expert in this process, on this rank's rows; the shards' gradients
        # collect every rank's rows, so the reference's are summed over the ranks
        exact = _run(lambda a, b, c: loop(a, d.counts_E, b, c, "swiglu"), x, w_in, w_out, n_kept)
        for g in exact[2:]:
            dist.all_reduce(g)
        exact[2:] = [_local(g, rank) for g in exact[2:]]
        static = _run(lambda a, b, c: expert_parallel_capacity(loop, a, d.counts_E, b, c, "swiglu", None, C),
                      x, _local(w_in, rank), _local(w_out, rank), n_kept)
        errs = [float((a - b).norm() / max(float(a.norm()), 1e-12)) for a, b in zip(exact, static)]
        to_rank1 = int(d.counts_E[E // WORLD:].sum())  # rows this rank sends to rank 1's experts
        out[(rank, skew)] = (errs, int(d.n_dropped), to_rank1)

    # one graph: no graph break, so no host read of the counts
    d, C, x, w_in, w_out = _case(rank, False)
    w_in, w_out = _local(w_in, rank), _local(w_out, rank)
    torch._dynamo.reset()
    compiled = torch.compile(expert_parallel_capacity, fullgraph=True, backend="eager")
    y_c = compiled(_equal_rows_backend, x, d.counts_E, w_in, w_out, "swiglu", None, C)
    y_e = expert_parallel_capacity(_equal_rows_backend, x, d.counts_E, w_in, w_out, "swiglu", None, C)
    n_kept = int(d.counts_E.sum())
    out[(rank, "compiled")] = float((y_c[:n_kept] - y_e[:n_kept]).abs().max())


def test_static_exchange_matches_the_exact_one():
    with mp.Manager() as manager:
        out = manager.dict()
        spawn_gloo(_worker, WORLD, out)
        out = dict(out)
    for rank in range(WORLD):
        for skew in (False, True):
            errs, dropped, to_rank1 = out[(rank, skew)]
            assert max(errs) < 1e-6, (rank, skew, errs)
            if skew:
                assert to_rank1 == 0  # rank 1's experts receive nothing from anyone
        assert out[(rank, "compiled")] == 0.0
    assert any(out[(r, False)][1] > 0 for r in range(WORLD))  # capacity dropped rows somewhere


def _any_rows_backend(x_SD, counts_E, w_in_LID, w_out_LDF, kind, scale_S=None):
    """A backend for any rows per expert without a host read: each row's expert found
    from the counts, its weights gathered (tiny sizes only); the backend interface's
    per-row scale (the routing weights, from the all-gather dispatch) included."""
    L = w_in_LID.shape[0]
    e_S = torch.bucketize(torch.arange(x_SD.shape[0]), counts_E.cumsum(0), right=True).clamp(max=L - 1)
    gate, up = torch.einsum("sd,sfd->sf", x_SD, w_in_LID[e_S]).chunk(2, dim=-1)
    y = torch.einsum("sf,sdf->sd", torch.nn.functional.silu(gate) * up, w_out_LDF[e_S])
    return y if scale_S is None else y * scale_S[:, None]


def _gather_worker(rank, out):
    from experts.parallel import expert_parallel, expert_parallel_gather

    gen = torch.Generator().manual_seed(20 + rank)
    ids = torch.rand(T, E, generator=gen).argsort(-1)[:, :K]
    d = dispatch(ids, E)
    x, w = torch.randn(T, D, generator=gen), torch.rand(T, K, generator=gen)
    gen_w = torch.Generator().manual_seed(99)
    w_in, w_out = torch.randn(E, 2 * F, D, generator=gen_w), torch.randn(E, D, F, generator=gen_w)
    w_in, w_out = _local(w_in, rank), _local(w_out, rank)
    args = (x, w, d, w_in, w_out, "swiglu", None)
    torch._dynamo.reset()
    # fullgraph: no graph break anywhere, so no host read of the counts
    compiled = torch.compile(expert_parallel_gather, fullgraph=True, backend="eager")
    y_c = compiled(_any_rows_backend, *args)
    y_g = expert_parallel_gather(_any_rows_backend, *args)
    y_a = expert_parallel(_any_rows_backend, *args)  # the token all-to-all
    out[rank] = (float((y_c - y_g).abs().max()), float((y_g - y_a).norm() / y_a.norm()))


def test_allgather_dispatch_traces_into_one_graph():
    """The dropless all-gather dispatch compiles with fullgraph=True (nothing read on
    the host) and gives the token all-to-all's output (both are checked against one
    process, gradients included, in test_parallel.py)."""
    with mp.Manager() as manager:
        out = manager.dict()
        spawn_gloo(_gather_worker, WORLD, out)
        out = dict(out)
    for rank in range(WORLD):
        traced, vs_alltoall = out[rank]
        assert traced < 1e-6 and vs_alltoall < 1e-6, (rank, out[rank])
