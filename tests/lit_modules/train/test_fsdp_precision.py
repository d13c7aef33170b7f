"""FSDP2 under bf16-mixed all-gathers weights in bf16 and reduces gradients in float32
onto float32 shards (lit_modules/train/strategy.py shard_model); other precisions keep
float32 throughout. Two gloo processes."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from arch.config import TrainConfig
from conftest import free_port, init_gloo, tiny_model


def _worker(rank, port, out):
    init_gloo(rank, 2, port)
    try:
        from lit_modules.train.strategy import shard_model

        for precision, dtype in (("bf16-mixed", torch.bfloat16), ("32-true", None)):
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
            if rank == 0:
                out[precision] = (policy.param_dtype, seen["w"], grad_dtypes, master, dtype)
    finally:
        dist.destroy_process_group()


def test_fsdp_gathers_bf16_under_bf16_mixed():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), out), nprocs=2)
        out = dict(out)
    policy, gathered, grads, master, _ = out["bf16-mixed"]
    assert policy == torch.bfloat16 and gathered == torch.bfloat16
    assert grads == {torch.float32} and master == {torch.float32}
    policy, gathered, grads, master, _ = out["32-true"]
    assert policy is None and gathered == torch.float32 and grads == {torch.float32}
