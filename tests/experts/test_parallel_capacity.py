"""The static-shape expert-parallel exchange for capacity-bounded layers
(experts/parallel.py expert_parallel_capacity) on two gloo processes: the same rows,
outputs and gradients as the whole experts in one process (expert gradients summed
over the ranks), including an expert group that receives nothing, and it traces into
one graph (no host sync, no graph break)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port, init_gloo
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


def _worker(rank, port, out):
    init_gloo(rank, WORLD, port)
    try:
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
    finally:
        dist.destroy_process_group()


def test_static_exchange_matches_the_exact_one():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD)
        out = dict(out)
    for rank in range(WORLD):
        for skew in (False, True):
            errs, dropped, to_rank1 = out[(rank, skew)]
            assert max(errs) < 1e-6, (rank, skew, errs)
            if skew:
                assert to_rank1 == 0  # rank 1's experts receive nothing from anyone
        assert out[(rank, "compiled")] == 0.0
    assert any(out[(r, False)][1] > 0 for r in range(WORLD))  # capacity dropped rows somewhere
