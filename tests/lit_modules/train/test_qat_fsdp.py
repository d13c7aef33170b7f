"""Quantization-aware training under FSDP2: two gloo processes with the model sharded
(lit_modules/train/strategy.py parallelize + shard_model) compute the loss and the
gradients of the single-process QAT model (each channel's scale sees its whole row:
the weights are fake-quantized after FSDP2's all-gather)."""
from __future__ import annotations

import torch

from arch.config import QATConfig, TrainConfig
from conftest import spawn_gloo, tiny_model

TRAIN = TrainConfig(strategy="fsdp", qat=QATConfig(format="int4_b32", include=["head"]))


def _worker(rank, path):
    from lit_modules.train.strategy import parallelize, shard_model

    model = tiny_model("qwen3_moe").train()
    parallelize(model, TRAIN)
    shard_model(model, TRAIN, torch.device("cpu"), "32-true")
    ids = torch.arange(24).view(2, 12) % 256
    out = model(ids, targets=ids)
    out.loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": out.loss.detach(), "grads": grads}, path)


def test_qat_under_fsdp2_matches_one_process(tmp_path):
    from lit_modules.train.strategy import parallelize

    spawn_gloo(_worker, 2, tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt")
    model = tiny_model("qwen3_moe").train()
    plain = model(torch.arange(24).view(2, 12) % 256, targets=torch.arange(24).view(2, 12) % 256).loss
    parallelize(model, TRAIN)
    ids = torch.arange(24).view(2, 12) % 256
    want = model(ids, targets=ids).loss
    want.backward()
    assert not torch.allclose(want, plain)  # quantization is on
    torch.testing.assert_close(got["loss"], want.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
