"""The global-batch loss and its gradients do not depend on how one optimizer
step's batch of 8 sequences is split: one micro-batch, 4 accumulation steps, or 2
gloo processes (with and without accumulation; gradients averaged over ranks as
DDP does). The aux-loss-free bias update lands on the same biases in every case."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from conftest import spawn_gloo, tiny_model
from experts.layers import clear_global_counts, next_micro_batch, precompute_global_counts, update_router_biases

OVERRIDES = ("model.moe.balance.aux_scope=global", "model.moe.balance.aux_coef=0.1",
             "model.moe.router.bias_update_rate=0.01", "model.n_layers=2")
N_SEQ, SEQ = 8, 12


def make_model():
    model = tiny_model("qwen3_moe", *OVERRIDES).train()
    with torch.no_grad():  # routers far from uniform, so the aux gradient is not tiny
        for m in model.moe_layers:
            m.router.gate.weight.normal_(std=0.5)
    return model


def step_loss(model, ids):
    out = model(ids, targets=ids.roll(-1, dims=1))
    return out.loss + sum(out.aux.values()), out.aux["aux_loss"]


def run_accumulated(model, micro_batches, one_more=False):
    """Gradient accumulation: precompute the counts, then backward the mean of the
    micro-batch losses. Returns the mean loss and aux loss. `one_more`: as the training
    loop does it, the pre-pass counts all micro-batches but the last, which trains first
    and completes the counts in its forward."""
    n = len(micro_batches)
    order = list(range(n))
    if one_more:
        assert precompute_global_counts(model, micro_batches[:-1], one_more=True)
        order = [n - 1] + order[:-1]
    else:
        precompute_global_counts(model, micro_batches)
    loss_sum = aux_sum = 0.0
    for pos, i in enumerate(order):
        if pos > 0:
            next_micro_batch(model)
        loss, aux = step_loss(model, micro_batches[i])
        (loss / n).backward()
        loss_sum, aux_sum = loss_sum + loss.detach() / n, aux_sum + aux.detach() / n
    clear_global_counts(model)
    return loss_sum, aux_sum


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def biases(model):
    return [m.router.expert_bias.clone() for m in model.moe_layers]


def assert_same(got, ref, what):
    for name in ref:
        err = ((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)).item()
        assert err < 1e-5, f"{what}: {name} differs (relative error {err:.2e})"


def _worker(rank, world, path):
    ref = torch.load(path)
    local = ref["ids"].chunk(world)[rank]
    for accum, one_more in ((1, False), (2, False), (2, True)):
        model = make_model()
        model.load_state_dict(ref["state"])
        if accum == 1:  # counts all-reduced inside forward
            loss, aux = step_loss(model, local)
            loss.backward()
        else:  # each rank: 2 micro-batches of 2 sequences, counts precomputed (one_more: of one)
            loss, aux = run_accumulated(model, list(local.chunk(accum)), one_more)
        # what DDP does: average gradients (and here the logged losses) over ranks
        for t in [loss, aux] + [p.grad for p in model.parameters()]:
            dist.all_reduce(t)
            t /= world
        assert abs(loss.item() - ref["loss"]) < 1e-5 * abs(ref["loss"]), (rank, accum, loss.item(), ref["loss"])
        assert abs(aux.item() - ref["aux"]) < 1e-5 * abs(ref["aux"]), (rank, accum, aux.item(), ref["aux"])
        assert_same(grads(model), ref["grads"], f"rank {rank}, {world} ranks x {accum} micro-batches")
        update_router_biases(model)
        for b, b_ref in zip(biases(model), ref["biases"]):
            assert torch.equal(b, b_ref), f"rank {rank}: biases differ from the single-process update"



@pytest.mark.slow
def test_global_batch_loss_is_split_invariant(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (N_SEQ, SEQ))

    # reference: the whole batch as one micro-batch, in one process
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, aux = step_loss(model, ids)
    loss.backward()
    ref = {"ids": ids, "state": state, "loss": loss.item(), "aux": aux.item(), "grads": grads(model)}
    update_router_biases(model)
    ref["biases"] = biases(model)
    assert all(b.abs().sum() > 0 for b in ref["biases"])  # the update did something

    # 4 accumulation steps of 2 sequences, counts precomputed: of all 4, and of 3 (the
    # training loop's way: the 4th completes them in its own forward)
    for one_more in (False, True):
        model = make_model()
        model.load_state_dict(state)
        loss4, aux4 = run_accumulated(model, list(ids.chunk(4)), one_more)
        assert loss4.item() == pytest.approx(ref["loss"], rel=1e-5)
        assert aux4.item() == pytest.approx(ref["aux"], rel=1e-5)
        assert_same(grads(model), ref["grads"], f"4 accumulation steps, one_more={one_more}")
        update_router_biases(model)
        assert all(torch.equal(b, r) for b, r in zip(biases(model), ref["biases"]))

    # without the precompute each micro-batch would use its own counts: the test
    # above must be able to tell the difference
    model = make_model()
    model.load_state_dict(state)
    naive = sum(step_loss(model, mb)[1].item() for mb in ids.chunk(4)) / 4
    assert abs(naive - ref["aux"]) > 1e-4 * ref["aux"]

    # 2 gloo processes, each 4 sequences (1 micro-batch, then 2 of 2)
    path = tmp_path / "ref.pt"
    torch.save(ref, path)
    spawn_gloo(_worker, 2, 2, str(path))


def test_running_counts_sum_the_micro_batches_so_far():
    """BalanceState's running form, by hand: micro-batch i gets the sum of the counts of
    micro-batches 1..i; a repeated forward of the same micro-batch (activation
    checkpointing) gets the same sum; clearing the step starts over."""
    from experts.balance import BalanceState

    b = BalanceState(3)
    b.running = True
    with torch.enable_grad():
        c1, n1 = b.step_counts(torch.tensor([1, 2, 3]), 6, training=True)
        assert c1.tolist() == [1, 2, 3] and int(n1) == 6
        again, _ = b.step_counts(torch.tensor([9, 9, 9]), 27, training=True)  # AC re-run
        assert again.tolist() == [1, 2, 3]
        b.next_micro_batch()
        c2, n2 = b.step_counts(torch.tensor([4, 0, 2]), 6, training=True)
        assert c2.tolist() == [5, 2, 5] and int(n2) == 12
        b.clear_step_counts()
        c3, _ = b.step_counts(torch.tensor([1, 0, 0]), 1, training=True)
        assert c3.tolist() == [1, 0, 0]


def test_other_counts_completed_by_the_next_forward():
    """BalanceState.set_other_counts, by hand: the next training forward gets the others'
    counts plus its own (and an activation-checkpointing re-run the same sum); after
    next_micro_batch that sum is the step's, whatever the later forwards count."""
    from experts.balance import BalanceState

    b = BalanceState(3)
    b.set_other_counts(torch.tensor([2, 0, 1]), torch.tensor(3))
    with torch.enable_grad():
        assert b.needs_sum(training=True)  # its own counts cross the ranks
        c, n = b.step_counts(torch.tensor([1, 2, 3]), 6, training=True)
        assert c.tolist() == [3, 2, 4] and int(n) == 9
        assert not b.needs_sum(training=True)  # the re-run sums nothing again
        again, _ = b.step_counts(torch.tensor([9, 9, 9]), 27, training=True)
        assert again.tolist() == [3, 2, 4]
        b.next_micro_batch()
        for other in ([0, 0, 7], [5, 1, 0]):
            c, n = b.step_counts(torch.tensor(other), 7, training=True)
            assert c.tolist() == [3, 2, 4] and int(n) == 9
        b.clear_step_counts()
        c, _ = b.step_counts(torch.tensor([1, 0, 0]), 1, training=True)
        assert c.tolist() == [1, 0, 0]


@torch.no_grad()
def test_precomputed_counts_route_with_the_document_masks():
    """train.document_mask: the pre-pass gets each micro-batch's document arguments
    (a third item), so its counts are those of the training forwards."""
    from arch.documents import document_ids

    model = make_model()
    ids = torch.randint(4, 256, (N_SEQ, SEQ), generator=torch.Generator().manual_seed(5))
    ids[:, 3::4] = 3  # documents of 4 tokens
    halves = [(x, x.roll(-1, dims=1), {"doc_ids": document_ids(x, 3)}) for x in ids.chunk(2)]
    layer = model.moe_layers[0]

    def counted(batches):
        layer.balance.start_counting()
        for x, y, docs in batches:
            model(x, targets=y, **docs)
        return layer.balance.stop_counting()[0]

    want = counted(halves)
    precompute_global_counts(model, halves)
    assert torch.equal(layer.balance._step[0], want)
    precompute_global_counts(model, [h[:2] for h in halves])  # without them: other routes
    assert not torch.equal(layer.balance._step[0], want)
    clear_global_counts(model)


@pytest.mark.parametrize("running", [False, True])
def test_a_training_forward_sums_its_counts_over_the_ranks_once(monkeypatch, running):
    """grad_accum = 1: the counts of every MoE layer cross the ranks in one all-reduce
    after the last layer (MoE.gather_aux), none inside a block, and each layer's loss is
    what its own step_counts gives; an evaluation forward starts no collective."""
    import experts.balance as balance

    calls = []
    real = balance.all_reduce_sum
    monkeypatch.setattr(balance, "all_reduce_sum", lambda t, group=None: calls.append(tuple(t.shape)) or real(t, group))
    model = make_model()
    for m in model.moe_layers:
        m.balance.running = running
    ids = torch.randint(0, model.cfg.vocab_size, (2, SEQ))
    # one process: f^G is this forward's own f, so the loss is the per-micro-batch one
    micro = copy.deepcopy(model)
    for m in micro.moe_layers:
        m.cfg.balance.aux_scope = "micro"
    out = model(ids, targets=ids.roll(-1, dims=1))
    L, E = len(model.moe_layers), model.cfg.moe.n_experts
    assert L == 2 and calls == [(L, E + 1)]
    torch.testing.assert_close(out.aux["aux_loss"], micro(ids, targets=ids.roll(-1, dims=1)).aux["aux_loss"])
    calls.clear()
    with torch.no_grad():
        model.eval()(ids, targets=ids.roll(-1, dims=1))
    assert calls == []
