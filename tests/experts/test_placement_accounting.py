"""MoE placement and shared experts: the meta-built model agrees with `count()`
(what `moelab inspect` prints) on total, active and matmul parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from arch import build_model, count
from conftest import tiny_recipe
from experts.moe import MoE

VARIANTS = {
    "every layer": [],
    "every 2nd, first dense": ["model.n_layers=6", "model.moe.every=2", "model.moe.first_k_dense=1"],
    "first 2 dense, overrides": ["model.n_layers=5", "model.moe.first_k_dense=2", "model.layer_overrides.0.moe=true",
                                 "model.layer_overrides.4.moe=false"],
    "shared experts + gate": ["model.moe.n_shared_experts=2", "model.moe.d_shared=48", "model.moe.shared_gate=true"],
    "shared, width default": ["model.moe.n_shared_experts=1", "model.moe.every=2"],
    "sigmoid, router bias, gelu": ["model.moe.router.kind=sigmoid_topk", "model.moe.router.bias=true",
                                   "model.moe.expert_ffn=gelu", "model.moe.capacity_factor=1.25"],
    "tied head": ["model.tie_embeddings=true", "model.moe.n_shared_experts=1", "model.moe.shared_gate=true"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_meta_model_matches_count(variant):
    cfg = tiny_recipe("qwen3_moe", *VARIANTS[variant]).model
    model = build_model(cfg, device="meta")
    acc = count(cfg)
    moe = [b.ffn if isinstance(b.ffn, MoE) else None for b in model.layers]
    layers = [m for m in moe if m is not None]
    assert [m is not None for m in moe] == acc.layer_moe
    assert len(layers) == acc.n_moe_layers > 0

    assert sum(p.numel() for p in model.parameters()) == acc.params_total
    per_expert = layers[0].w_in[0].numel() + layers[0].w_out[0].numel()
    E, K = cfg.moe.n_experts, cfg.moe.top_k
    assert acc.params_total - acc.params_active == len(layers) * (E - K) * per_expert
    assert acc.params_experts == sum(m.w_in.numel() + m.w_out.numel() for m in layers)
    assert acc.params_router == sum(p.numel() for m in layers for p in m.router.parameters())
    shared = sum(p.numel() for m in layers for mod in (m.shared, m.shared_gate) if mod is not None
                 for p in mod.parameters())
    assert acc.params_shared_experts == shared
    assert (shared > 0) == (cfg.moe.n_shared_experts > 0)

    # matmul parameters one token touches: every Linear weight (attention, dense FFN,
    # router, shared experts, head), K experts per MoE layer, the tied head
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    tied_head = model.embed.weight.numel() if model.head is None else 0
    assert acc.matmul_params_active == linear + tied_head + len(layers) * K * per_expert

    # the selection bias is state, not a parameter: it is saved but never counted
    assert sum(n.endswith("router.expert_bias") for n, _ in model.named_buffers()) == len(layers)
    assert not any("expert_bias" in n for n, _ in model.named_parameters())
    assert "router.expert_bias" in "".join(model.state_dict())


def test_shared_experts_are_one_ffn_of_the_summed_width():
    cfg = tiny_recipe("qwen3_moe", "model.moe.n_shared_experts=3", "model.moe.d_shared=16").model
    layer = build_model(cfg, device="meta").moe_layers[0]
    assert layer.shared.gate_proj.weight.shape == torch.Size([3 * 16, cfg.d_model])


def test_grouped_mm_widths_are_checked_at_load():
    from arch.registry import RecipeError

    with pytest.raises(RecipeError, match=r"model.moe.d_expert \(30\) must be a multiple of 8.*'loop'"):
        tiny_recipe("qwen3_moe", "model.moe.d_expert=30")
    assert tiny_recipe("qwen3_moe", "model.moe.d_expert=30", "model.moe.backend=loop").model.moe.d_expert == 30
