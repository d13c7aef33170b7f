"""Router statistics on a whole model: keyed by block index, cheap, detached."""
from __future__ import annotations

import math

import torch

from conftest import tiny_model
from experts.stats import expert_load, router_stats


def test_router_stats_per_block_index():
    model = tiny_model("qwen3_moe", "model.n_layers=4", "model.moe.every=2", "model.moe.first_k_dense=1",
                       "model.moe.capacity_factor=0.5").train()
    ids = torch.randint(0, 256, (2, 16))
    model(ids)
    stats = router_stats(model)
    assert sorted(stats) == [1, 3]  # the MoE blocks
    E, K, T = model.cfg.moe.n_experts, model.cfg.moe.top_k, ids.numel()
    C = math.ceil(0.5 * T * K / E)
    for s in stats.values():
        tpe = s["tokens_per_expert"]
        assert tpe.shape == (E,) and tpe.sum().item() == T * K
        assert s["dropped_tokens"].item() == (tpe - C).clamp_min(0).sum().item() > 0
        assert s["load_max_over_mean"].item() == tpe.max().item() / tpe.float().mean().item()
        assert 0 < s["entropy"].item() <= math.log(E) + 1e-6
        assert all(v.device == ids.device and not v.requires_grad for v in s.values())
    assert expert_load(model).shape == (2, E)


def test_stats_can_be_switched_off():
    model = tiny_model("qwen3_moe")
    for m in model.moe_layers:
        m.track_stats = False
    model(torch.randint(0, 256, (1, 8)))
    assert router_stats(model) == {} and expert_load(model).numel() == 0
