"""AdamW groups and learning-rate schedules (lit_modules/train/optim.py), no training."""
import math

import pytest
import torch

from arch import RecipeError, build_model
from arch.config import OptimConfig
from conftest import tiny_recipe
from lit_modules.train.optim import build_optimizer, lr_multiplier, param_groups


def test_decay_groups_follow_the_rule():
    """Matrices decay (projections, stacked experts, router, embedding, head); vectors
    (norm weights, biases) do not; every trainable parameter is in exactly one group."""
    model = build_model(tiny_recipe("qwen3_moe", "model.attention.bias=true").model, "meta")
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for p in groups["decay"]["params"]}
    no_decay = {by_id[id(p)] for p in groups["no_decay"]["params"]}
    assert decay | no_decay == set(by_id.values()) and not decay & no_decay
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    for name in ("embed.weight", "head.weight", "layers.0.ffn.w_in", "layers.0.ffn.w_out",
                 "layers.0.ffn.router.gate.weight", "layers.1.attn.q_proj.weight"):
        assert name in decay, name
    for name in ("norm.weight", "layers.0.attn_norm.weight", "layers.0.attn.q_proj.bias"):
        assert name in no_decay, name
    assert any("q_norm" in n or "k_norm" in n for n in no_decay)  # QK-norm weights


def test_router_bias_is_not_optimized():
    model = build_model(tiny_recipe("qwen3_moe", "model.moe.router.bias_update_rate=0.01").model, "meta")
    params = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert all(id(b) not in params for n, b in model.named_buffers() if "expert_bias" in n)


def sched(step, schedule, warmup=10, total=100, r=0.1, decay=0.2):
    return lr_multiplier(step, schedule=schedule, warmup_steps=warmup, max_steps=total,
                         min_lr_ratio=r, decay_fraction=decay)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup(schedule):
    assert sched(0, schedule) == pytest.approx(0.1)  # (s + 1) / W
    assert sched(4, schedule) == pytest.approx(0.5)
    assert sched(9, schedule) == pytest.approx(1.0)
    assert sched(10, schedule) == pytest.approx(1.0)


def test_cosine_values():
    # p = (s - 10) / 90; r + (1 - r)(1 + cos(pi p)) / 2
    assert sched(55, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)  # half way: p = 0.5
    assert sched(40, "cosine") == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 3)))
    assert sched(100, "cosine") == pytest.approx(0.1)
    assert sched(150, "cosine") == pytest.approx(0.1)  # past the end: stays at the floor
    values = [sched(s, "cosine") for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_values():
    # stable until D = 100 - 20 = 80, then linear to r at 100
    assert sched(50, "wsd") == 1.0 and sched(79, "wsd") == 1.0 and sched(80, "wsd") == 1.0
    assert sched(90, "wsd") == pytest.approx(1 - 0.9 * 0.5)
    assert sched(95, "wsd") == pytest.approx(1 - 0.9 * 0.75)
    assert sched(100, "wsd") == pytest.approx(0.1)


def test_constant_and_no_warmup():
    assert sched(0, "constant", warmup=0) == 1.0 and sched(99, "constant") == 1.0
    assert sched(0, "cosine", warmup=0) == pytest.approx(1.0)


def test_scheduler_drives_the_optimizer():
    model = torch.nn.Linear(4, 4)
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, schedule="wsd", decay_fraction=0.5, min_lr_ratio=0.0)
    opt, sch = build_optimizer(model, cfg, max_steps=8, device_type="cpu")
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.1, "no_decay": 0.0}
    assert not opt.defaults["fused"]  # fused AdamW only by default on CUDA


@pytest.mark.parametrize("field,value,words", [
    ("schedule", "cosin", "did you mean 'cosine'"),
    ("lr", 0.0, "must be positive"),
    ("min_lr_ratio", 1.5, "[0, 1]"),
    ("betas", [0.9], "two numbers"),
])
def test_bad_optim_settings(field, value, words):
    cfg = OptimConfig(**{field: value})
    with pytest.raises(RecipeError, match=words.replace("[", r"\[").replace("]", r"\]")):
        build_optimizer(torch.nn.Linear(2, 2), cfg, max_steps=10, device_type="cpu")


@pytest.mark.parametrize("fused", [True, False])
def test_type_split_adamw_matches_per_tensor_adamw(fused):
    """A group mixing DTensors and plain tensors (FSDP2 + expert parallel): the
    fused / foreach kernels refuse the mix; TypeSplitAdamW updates each type with the
    group's kernel and must equal the per-tensor AdamW, step after step, with the
    same state layout."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    from conftest import free_port, init_gloo
    from lit_modules.train.optim import TypeSplitAdamW

    threads = torch.get_num_threads()
    init_gloo(0, 1, free_port())
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        values = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2), torch.randn(3)]

        def params():
            ps = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Replicate()])) if i % 2 == 0
                  else torch.nn.Parameter(v.clone()) for i, v in enumerate(values)]
            return [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0}]

        def full(p):
            return p.full_tensor() if isinstance(p, DTensor) else p.detach()

        groups_a, groups_b = params(), params()
        assert any(isinstance(p, DTensor) for p in groups_a[0]["params"])
        split = TypeSplitAdamW(groups_a, lr=1e-2, fused=fused, foreach=None if fused else True)
        if not fused:  # the mixed group really is refused by the foreach kernel
            with pytest.raises(Exception, match="DTensor"):
                plain = torch.optim.AdamW(params(), lr=1e-2, foreach=True)
                for g in plain.param_groups:
                    for p in g["params"]:
                        p.grad = torch.ones_like(p)
                plain.step()
        reference = torch.optim.AdamW(groups_b, lr=1e-2, foreach=False)
        for step in range(3):
            for opt in (split, reference):
                for g in opt.param_groups:
                    for p in g["params"]:
                        p.grad = torch.full_like(p, 0.1 * (step + 1)) + 0.01 * p.detach()
                opt.step()
        a = [full(p) for g in split.param_groups for p in g["params"]]
        b = [full(p) for g in reference.param_groups for p in g["params"]]
        for x, y, v in zip(a, b, values):
            assert not torch.equal(x, v)  # the parameter moved
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        assert [len(g["params"]) for g in split.param_groups] == [3, 1]  # groups restored
        assert all(int(split.state[p]["step"]) == 3 for g in split.param_groups for p in g["params"])
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
