"""Expert parallelism (experts/parallel.py) on two gloo processes, float32: an EP=2
MoE layer gives the single-process output and gradients (relative error < 1e-5),
with uneven splits in both directions (one case sends nothing one way), with and
without capacity dropping, for both backends and both dropless dispatches (the token
all-to-all and the static all-gather); a whole tiny model with the global-batch loss
and the bias update gives the single-process loss, gradients and biases once
gradients are averaged as the training loop does. The dropless layer also runs
compiled (aot_eager) and must give the same gradients."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist

from conftest import spawn_gloo, tiny_model
from moe_helpers import GLOBAL_BALANCE, rel_err
from experts.layers import update_router_biases
from experts.layers import check_expert_parallel, reduce_expert_grads, shard_experts
from experts.triton_backend import interpreting

WORLD, N_TOK, SEQ = 2, 24, 12
MODEL = GLOBAL_BALANCE


def make_layer(backend, capacity, skew, bias=False):
    extra = ("model.moe.router.bias_update_rate=0.01",) if skew else ()
    if bias:  # gpt-oss's experts: biases (sharded with their experts) and the clamped SwiGLU
        extra += ("model.moe.expert_bias=true", "model.moe.expert_ffn=swiglu_clamped")
    model = tiny_model("qwen3_moe", f"model.moe.backend={backend}", f"model.moe.capacity_factor={capacity}",
                       "model.n_layers=1", *extra).train()
    layer = model.moe_layers[0]
    with torch.no_grad():
        layer.router.gate.weight.normal_(std=0.5)  # uneven loads
        if bias:
            layer.b_in.normal_(std=0.5)
            layer.b_out.normal_(std=0.5)
        if skew:  # the selection bias makes experts 0-3 (rank 0's) win every token:
            layer.router.expert_bias[:4] = 10.0  # rank 1 receives no rows, rank 0 sends it none
    return layer


def layer_cases():
    cases = [("grouped_mm", "null", False), ("loop", "null", False), ("grouped_mm", 1.0, False),
             ("grouped_mm", "null", True), ("grouped_mm", "null", False, True), ("loop", 1.0, False, True)]
    # the fused Triton backend inside both exchanges (its `fused` entry under allgather),
    # on the CPU through Triton's interpreter
    if importlib.util.find_spec("triton") is not None and interpreting():
        cases.append(("triton", "null", False))
    return cases


def layer_reference(case, x, g):
    """Each rank's tokens through the whole layer in one process (capacity is per
    rank's tokens under EP, as under data parallelism); loss = sum of y * g."""
    layer = make_layer(*case)
    x = x.clone().requires_grad_()
    y = torch.cat([layer(xr) for xr in x.chunk(WORLD)])
    (y * g).sum().backward()
    return {"y": y.detach(), "x": x.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}


def _worker(rank, path):
    ref = torch.load(path)
    runs = [(case, r, False, "alltoall") for case, r in zip(layer_cases(), ref["layers"])]
    # dropless loop, traced (aot_eager: the graphs Inductor gets): torch 2.11 gave
    # wrong gradients through the uneven exchange's autograd (issue 21)
    runs.append((layer_cases()[1], ref["layers"][1], True, "alltoall"))
    # the all-gather dispatch on every dropless case, and traced
    runs += [(case, r, False, "allgather") for case, r in zip(layer_cases(), ref["layers"]) if case[1] == "null"]
    runs.append((layer_cases()[1], ref["layers"][1], True, "allgather"))
    for case, r, compiled, how in runs:
        layer = make_layer(*case)
        names = shard_experts(layer, None, how)
        assert names == ["w_in", "w_out"] + (["b_in", "b_out"] if case[3:] == (True,) else [])
        if compiled:
            torch._dynamo.reset()
            layer.compile(backend="aot_eager")
        x = ref["x"].chunk(WORLD)[rank].clone().requires_grad_()
        y = layer(x)
        (y * ref["g"].chunk(WORLD)[rank]).sum().backward()
        if case[2]:  # the skewed case really is one-sided
            assert layer.stats["tokens_per_expert"][4:].sum() == 0
        assert rel_err(y, r["y"].chunk(WORLD)[rank]) < 1e-5, (case, compiled, how)
        assert rel_err(x.grad, r["x"].chunk(WORLD)[rank]) < 1e-5, (case, compiled, how)
        for n, p in layer.named_parameters():
            want = r[n]
            if n in names:  # this rank's slice; its gradient already holds both ranks' tokens
                want = want.chunk(WORLD)[rank]
            else:  # replicated: sum the ranks' parts (the losses are sums)
                dist.all_reduce(p.grad)
            assert rel_err(p.grad, want) < 1e-5, (case, compiled, how, n, rel_err(p.grad, want))

    for how in ("alltoall", "allgather"):
        _whole_model(rank, ref, how)


def _whole_model(rank, ref, how):
    """Global-batch aux loss and bias update through EP=2, gradients averaged as DDP does."""
    model = tiny_model("qwen3_moe", *MODEL).train()
    model.load_state_dict(ref["model_state"])
    names = set(shard_experts(model, None, how))
    ids = ref["ids"].chunk(WORLD)[rank]
    out = model(ids, targets=ids.roll(-1, dims=1))
    loss = out.loss + sum(out.aux.values())
    loss.backward()
    for n, p in model.named_parameters():
        if n not in names:
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    reduce_expert_grads(model, WORLD)
    dist.all_reduce(loss.detach_())
    assert abs(loss.item() / WORLD - ref["loss"]) < 1e-5 * ref["loss"]
    for n, p in model.named_parameters():
        want = ref["model_grads"][n].chunk(WORLD)[rank] if n in names else ref["model_grads"][n]
        assert rel_err(p.grad, want) < 1e-5, (n, rel_err(p.grad, want))
    update_router_biases(model)
    for m, b in zip(model.moe_layers, ref["biases"]):
        assert torch.equal(m.router.expert_bias, b)


@pytest.mark.slow
def test_ep2_matches_single_process(tmp_path):
    torch.manual_seed(0)
    x, g = torch.randn(N_TOK, 64), torch.randn(N_TOK, 64)
    layers = [layer_reference(case, x, g) for case in layer_cases()]
    assert layers[2]["y"].ne(layers[0]["y"]).any()  # capacity dropped something

    model = tiny_model("qwen3_moe", *MODEL).train()
    with torch.no_grad():
        for m in model.moe_layers:
            m.router.gate.weight.normal_(std=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (4, SEQ))
    out = model(ids, targets=ids.roll(-1, dims=1))
    loss = out.loss + sum(out.aux.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    update_router_biases(model)
    ref = {"x": x, "g": g, "layers": layers, "ids": ids, "model_state": state, "loss": loss.item(),
           "model_grads": grads, "biases": [m.router.expert_bias.clone() for m in model.moe_layers]}
    path = tmp_path / "ref.pt"
    torch.save(ref, path)
    spawn_gloo(_worker, WORLD, str(path))


def test_expert_parallel_must_divide_experts():
    check_expert_parallel(8, 4)
    with pytest.raises(ValueError, match="model.moe.n_experts = 6 is not divisible by train.expert_parallel = 4"):
        check_expert_parallel(6, 4)
