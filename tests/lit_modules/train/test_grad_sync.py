"""train.grad_sync = step: `GradAverager` makes every gradient its mean over the ranks
(2 gloo processes), packing gradients of each dtype into flat buckets, several of them
in flight, in float32 or over a bf16 wire; parameters without a gradient stay without.
Training under it equals one process: tests/lit_modules/train/test_train.py
(test_ddp_two_ranks_match_one)."""
import torch

from conftest import spawn_gloo

SHAPES = [(3, 4), (7,), (2, 2, 2), (5,), (1,), (6, 3)]


def _grads(rank: int):
    """The parameters of rank `rank`: float32 and bf16 gradients, one parameter without."""
    gen = torch.Generator().manual_seed(100 + rank)
    params = []
    for i, shape in enumerate(SHAPES):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16 if i % 3 == 2 else torch.float32))
        if i != 4:
            p.grad = torch.randn(shape, generator=gen).to(p.dtype)
        params.append(p)
    return params


def _average_worker(rank: int, bucket: int, wire: str):
    import lit_modules.train.strategy as strategy

    strategy.GRAD_BUCKET_ELEMENTS = bucket
    params = _grads(rank)
    # without its hooks: every bucket sent by finish
    strategy.GradAverager(params, 2, wire_dtype=torch.bfloat16 if wire == "bf16" else None, overlap=False).finish()
    want = [None if a.grad is None else ((a.grad.double() + b.grad.double()) / 2) for a, b in zip(_grads(0), _grads(1))]
    before = _grads(rank)
    for i, (p, w) in enumerate(zip(params, want)):
        if w is None:
            assert p.grad is None
            continue
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
        tol = 1e-6 if wire == "float32" and p.dtype == torch.float32 else 2e-2
        assert torch.allclose(p.grad.double(), w, atol=tol, rtol=tol), (rank, p.shape, p.grad, w)
        assert not torch.equal(p.grad, before[i].grad)  # it changed


def test_average_grads_in_small_buckets_and_one_large():
    # 5 elements: most gradients a bucket of their own, some split across the dtype
    # change; 1 << 26: one bucket per dtype
    for bucket in (5, 1 << 26):
        spawn_gloo(_average_worker, 2, bucket, "float32")


def test_average_grads_over_a_bf16_wire():
    spawn_gloo(_average_worker, 2, 8, "bf16")


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Tanh(),
                            torch.nn.Linear(4, 3))
    m.unused = torch.nn.Parameter(torch.ones(2))  # gets no gradient: skipped on every rank
    return m


def _loss(m, rank: int, micro: int):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(10 * rank + micro))
    return m(x).square().sum()


def _overlap_worker(rank: int):
    import lit_modules.train.strategy as strategy

    strategy.GRAD_BUCKET_ELEMENTS = 25  # several buckets: (w3 b3) (b2 w2) ... in backward's order
    m = _model()
    avg = strategy.GradAverager(list(m.parameters()), 2)
    assert len(avg.buckets) >= 3
    # two micro-batches: the first accumulates locally, the second's hooks start the buckets
    avg.sync = False
    _loss(m, rank, 0).backward()
    assert not avg._sent
    avg.sync = True
    _loss(m, rank, 1).backward()
    sent_in_backward = len(avg._sent)
    avg.finish()
    assert sent_in_backward == len(avg.buckets) - 1  # all but the unused parameter's, during backward
    # the reference: both ranks' micro-batches on one model here, averaged over the ranks
    ref = _model()
    for r in (0, 1):
        for micro in (0, 1):
            (_loss(ref, r, micro) / 2).backward()
    assert m.unused.grad is None
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    # the next step starts clean: its backward sends again
    m.zero_grad(set_to_none=True)
    _loss(m, rank, 2).backward()
    assert len(avg._sent) == sent_in_backward
    avg.finish()


def test_buckets_start_during_backward_and_average_over_accumulated_micro_batches():
    spawn_gloo(_overlap_worker, 2)
