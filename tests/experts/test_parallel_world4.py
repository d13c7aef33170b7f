"""Expert parallelism smaller than the world, on four gloo processes (float32).

The groups are built as `moelab train` builds them (lit_modules.train.strategy.shard_model
with train.expert_parallel = 2 in a world of 4):

                 expert ->
    data_parallel  [0 1]   EP group {0, 1}: rank 0 holds experts 0-3, rank 1 experts 4-7
         |         [2 3]   EP group {2, 3}: the same split
    expert-data-parallel groups (same shard): {0, 2} and {1, 3}

A whole tiny MoE model (global-batch aux loss, router bias update) with a quarter of
the batch per rank, its replicated gradients averaged over the world as DDP does and
its expert gradients by `ScalePlan.finish_grads` (experts.layers.reduce_expert_grads
over the expert-data-parallel group), gives the single-process loss, every gradient
and the gradient norm (relative error < 1e-5) and bit-identical router biases. Every
rank sends unequal numbers of rows to the two ranks of its EP group, and gathering a
shard over its EP group gives back the whole expert weights (what checkpoints do)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from arch.config import TrainConfig
from conftest import spawn_gloo, tiny_model
from moe_helpers import GLOBAL_BALANCE, rel_err
from experts.layers import update_router_biases
from experts.parallel import gather_expert_shard
from lit_modules.train.strategy import shard_model

WORLD, EP, SEQ = 4, 2, 16
MODEL = GLOBAL_BALANCE


def _worker(rank, path):
    ref = torch.load(path)
    model = tiny_model("qwen3_moe", *MODEL).train()
    model.load_state_dict(ref["state"])
    plan = shard_model(model, TrainConfig(strategy="ddp", expert_parallel=EP), torch.device("cpu"))
    # really EP < world: rows of the mesh are EP groups, columns hold the same shard
    assert (plan.world, plan.ep) == (WORLD, EP)
    assert dist.get_process_group_ranks(plan.ep_group) == list(range(rank - rank % EP, rank - rank % EP + EP))
    assert dist.get_process_group_ranks(plan.edp_group) == list(range(rank % EP, WORLD, EP))
    names = set(plan.expert_names)
    assert names == {n for n in ref["grads"] if n.endswith(("ffn.w_in", "ffn.w_out"))} and names
    shard = rank % EP  # this rank's index in its EP group
    for n in names:
        whole = ref["state"][n]
        assert whole.shape[0] == 8 and torch.equal(model.get_parameter(n), whole.chunk(EP)[shard])

    ids = ref["ids"].chunk(WORLD)[rank]
    out = model(ids, targets=ids.roll(-1, dims=1))
    for layer in model.moe_layers:  # rows sent to each rank of the EP group: unequal
        send = layer.stats["tokens_per_expert"].view(EP, -1).sum(1)
        assert send[0] != send[1], (rank, send)
    loss = out.loss + sum(out.aux.values())
    loss.backward()
    for n, p in model.named_parameters():  # what DDP does for the replicated weights
        if n not in names:
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    plan.finish_grads(model)  # expert shards: mean over the ranks holding them
    norm = plan.clip(model, 0.0)

    dist.all_reduce(loss.detach_())
    assert abs(loss.item() / WORLD - ref["loss"]) < 1e-5 * ref["loss"]
    for n, p in model.named_parameters():
        want = ref["grads"][n].chunk(EP)[shard] if n in names else ref["grads"][n]
        assert rel_err(p.grad, want) < 1e-5, (rank, n, rel_err(p.grad, want))
    assert abs(norm.item() - ref["norm"]) < 1e-5 * ref["norm"]
    update_router_biases(model)  # loads summed over all four ranks
    for layer, b in zip(model.moe_layers, ref["biases"]):
        assert torch.equal(layer.router.expert_bias, b)
    for n in plan.expert_names:  # what a checkpoint gathers (a list: the same order on every rank)
        assert torch.equal(gather_expert_shard(model.get_parameter(n).detach(), plan.ep_group), ref["state"][n])


@pytest.mark.slow
def test_ep2_in_world4_matches_single_process(tmp_path):
    model = tiny_model("qwen3_moe", *MODEL).train()
    torch.manual_seed(4)  # a seed where every rank's two splits differ in both layers (checked by the workers)
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.gate.weight.normal_(std=0.5)  # uneven loads
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (WORLD, SEQ))
    out = model(ids, targets=ids.roll(-1, dims=1))
    assert "aux_loss" in out.aux
    loss = out.loss + sum(out.aux.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.get_total_norm(list(grads.values())).item()
    update_router_biases(model)
    biases = [layer.router.expert_bias.clone() for layer in model.moe_layers]
    assert all(b.ne(0).any() for b in biases)  # the update moved them: the comparison can fail
    path = tmp_path / "ref.pt"
    torch.save({"state": state, "ids": ids, "loss": loss.item(), "grads": grads, "norm": norm,
                "biases": biases}, path)
    spawn_gloo(_worker, WORLD, str(path))
