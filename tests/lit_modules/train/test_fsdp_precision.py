"""FSDP2 under bf16-mixed all-gathers weights in bf16 and reduces gradients in float32
onto float32 shards (lit_modules/train/strategy.py shard_model); other precisions keep
float32 throughout. train.reshard_after_forward=false keeps the gathered weights from
forward to backward. train.grad_reduce_dtype=bf16 reduces gradients in bf16 (FSDP2's
reduce dtype; DDP through moelab's hook). Two gloo processes."""
from __future__ import annotations

import pytest
import torch

from arch.config import TrainConfig
from conftest import spawn_gloo, tiny_model


def _worker(rank, path):
    out = {}
    from lit_modules.train.strategy import shard_model

    for precision in ("bf16-mixed", "32-true"):
        model = tiny_model("qwen3_moe").train()
        shard_model(model, TrainConfig(strategy="fsdp"), torch.device("cpu"), precision)
        policy = model.layers[0]._get_fsdp_state()._mp_policy
        ids = torch.randint(0, 256, (2, 8))
        seen = {}
        def record(module, args):  # the weight dtype the block computes with
            seen.setdefault("w", next(module.parameters()).dtype)

        hook = model.layers[0].attn.register_forward_pre_hook(record)
        out_ = model(ids, targets=ids)
        out_.loss.backward()
        hook.remove()
        grad_dtypes = {p.grad.dtype for p in model.parameters() if p.grad is not None}
        master = {p.dtype for p in model.parameters()}
        out[precision] = (policy.param_dtype, seen["w"], grad_dtypes, master)
    if rank == 0:
        torch.save(out, path)


def test_fsdp_gathers_bf16_under_bf16_mixed(tmp_path):
    spawn_gloo(_worker, 2, tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt")
    policy, gathered, grads, master = out["bf16-mixed"]
    assert policy == torch.bfloat16 and gathered == torch.bfloat16
    assert grads == {torch.float32} and master == {torch.float32}
    policy, gathered, grads, master = out["32-true"]
    assert policy is None and gathered == torch.float32 and grads == {torch.float32}


def _reshard_worker(rank, path):
    from lit_modules.train.strategy import shard_model
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = tiny_model("qwen3_moe").train()
    ids = torch.randint(0, 256, (2, 8))
    before = model(ids, targets=ids).loss.item()  # the same weights and batch on both ranks
    shard_model(model, TrainConfig(strategy="fsdp", reshard_after_forward=False), torch.device("cpu"))
    loss = model(ids, targets=ids).loss
    sharded_after_forward = isinstance(next(model.layers[0].parameters()), DTensor)
    loss.backward()
    sharded_after_backward = isinstance(next(model.layers[0].parameters()), DTensor)
    if rank == 0:
        torch.save((before, loss.item(), sharded_after_forward, sharded_after_backward), path)


def test_reshard_after_forward_false_keeps_the_gathered_weights_until_backward(tmp_path):
    spawn_gloo(_reshard_worker, 2, tmp_path / "out.pt")
    before, loss, after_forward, after_backward = torch.load(tmp_path / "out.pt")
    assert loss == pytest.approx(before, abs=1e-6)
    assert not after_forward and after_backward  # gathered from forward to backward, then sharded again


def _reduce_worker(rank, path):
    """train.grad_reduce_dtype: FSDP2's reduce dtype, and DDP's gradients through the
    strategy's own hook registration against DDP's float32 all-reduce."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lit_modules.train.strategy import _ddp, shard_model

    out = {}
    for precision in ("bf16-mixed", "32-true"):
        model = tiny_model("qwen3_moe").train()
        shard_model(model, TrainConfig(strategy="fsdp", grad_reduce_dtype="bf16"), torch.device("cpu"), precision)
        ids = torch.randint(0, 256, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            model(ids, targets=ids).loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g.full_tensor() if hasattr(g, "full_tensor") else g).all()) for g in grads)
        out[precision] = (model.layers[0]._get_fsdp_state()._mp_policy.reduce_dtype,
                          {g.dtype for g in grads}, finite and len(grads) > 10)
    grads = {}
    for dtype in ("float32", "bf16"):
        model = DDP(tiny_model("qwen3_moe").train())  # the same weights on both ranks (seed 0)
        strategy = _ddp(TrainConfig(strategy="ddp", devices=2, grad_reduce_dtype=dtype))
        strategy.model = model
        strategy._register_ddp_hooks()
        torch.manual_seed(rank)  # each rank its own batch
        ids = torch.randint(0, 256, (2, 8))
        model(ids, targets=ids).loss.backward()
        grads[dtype] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save((out, grads), path)


def test_grad_reduce_dtype_bf16(tmp_path):
    spawn_gloo(_reduce_worker, 2, tmp_path / "out.pt")
    policies, grads = torch.load(tmp_path / "out.pt")
    for precision, (reduce, grad_dtypes, finite) in policies.items():  # reduced in bf16, kept in float32
        assert reduce == torch.bfloat16 and grad_dtypes == {torch.float32} and finite, precision
    assert set(policies) == {"bf16-mixed", "32-true"}
    exact, bf16 = grads["float32"], grads["bf16"]
    assert exact.keys() == bf16.keys() and len(exact) > 10
    worst = max(((bf16[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in exact.items())
    assert 0 < worst < 1e-2  # rounded to bf16 (8 bits of mantissa), so close but not equal
    for n, g in bf16.items():  # every averaged gradient is a bf16 value kept in float32
        assert g.dtype == torch.float32 and torch.equal(g, g.bfloat16().float()), n


def test_grad_reduce_dtype_refused_before_any_work():
    from arch.registry import RecipeError
    from lit_modules.train.strategy import build_strategy

    with pytest.raises(RecipeError, match=r"train.grad_reduce_dtype = 'fp16' is not a dtype.*float32 or bf16"):
        build_strategy(TrainConfig(strategy="ddp", devices=2, grad_reduce_dtype="fp16"))
