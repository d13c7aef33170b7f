"""FSDP2 under bf16-mixed all-gathers weights in bf16 and reduces gradients in float32
onto float32 shards (lit_modules/train/strategy.py shard_model); other precisions keep
float32 throughout. train.reshard_after_forward=false keeps the gathered weights from
forward to backward. Two gloo processes."""
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
