"""Random combinations of recipe settings on the tiny proxies (a fixed seed per case):
a combination is either refused when the recipe loads, one sentence per problem, or it
builds, and one forward and backward on the CPU give a finite loss and finite gradients;
an MoE's expert backend agrees with the loop reference. What a sweep of such
combinations found once: sinks under SDPA and a per-layer input beside gpt-oss's clamped
FFN failed only when the model ran, after data preparation."""
from __future__ import annotations

import random

import pytest
import torch

import experts  # noqa: F401  (registers the MoE layer)
from arch import RecipeError, build_model, load_recipe

BASES = ["proxies/qwen3_moe_tiny", "proxies/gemma3_tiny", "proxies/deepseek_v3_tiny", "proxies/gpt_oss_tiny",
         "proxies/gemma4_moe_tiny", "proxies/qwen3_next_tiny", "proxies/dense_tiny"]
MENU = {
    "model.n_layers": [1, 2, 3, 4],
    "model.attention.n_kv_heads": [1, 2, "null"],
    "model.attention.qk_norm": ["true", "false"],
    "model.attention.impl": ["auto", "eager", "sdpa"],
    "model.attention.softcap": ["null", 20.0],
    "model.attention.v_norm": ["true", "false"],
    "model.attention.output_gate": ["true", "false"],
    "model.layer_pattern": ["[global]", "[local,global]"],
    "model.layer_kinds.local.window": [4, 100],
    "model.moe.top_k": [1, 2, 3],
    "model.moe.capacity_factor": ["null", 0.5, 1.25],
    "model.moe.n_shared_experts": [0, 1],
    "model.moe.expert_bias": ["true", "false"],
    "model.moe.router.kind": ["softmax_topk", "topk_softmax", "sigmoid_topk"],
    "model.moe.router.n_group": [1, 2],
    "model.moe.router.bias_update_rate": [0.0, 0.001],
    "model.moe.balance.aux_scope": ["micro", "global", "pooled"],
    "model.moe.balance.z_coef": [0.0, 0.001],
    "model.moe.first_k_dense": [0, 1],
    "model.ffn.kind": ["swiglu", "geglu", "gelu"],
    "model.norm_placement": ["pre", "sandwich"],
    "model.tie_embeddings": ["true", "false"],
    "model.final_softcap": ["null", 30.0],
    "model.kv_shared_layers": [0, 1],
    "model.per_layer_input.dim": [0, 8],
    "model.mtp.depth": [0, 1],
}
CASES = 24


def settings(seed: int):
    rng = random.Random(seed)
    keys = rng.sample(sorted(MENU), rng.randint(1, 5))
    return rng.choice(BASES), [f"{k}={rng.choice(MENU[k])}" for k in keys]


def loss_and_grads(recipe, state=None):
    torch.manual_seed(0)
    model = build_model(recipe.model, device="cpu").train()
    if state is not None:
        model.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, recipe.model.vocab_size, (2, 12), generator=g) for _ in range(2))
    torch.manual_seed(2)  # router jitter, if any, draws alike on both sides
    out = model(x, targets=y)
    loss = out.loss + sum(out.aux.values())
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", range(CASES))
def test_random_settings_load_and_train_or_are_refused(seed):
    base, overrides = settings(seed)
    overrides += ["model.fused_ce_chunk=0", "model.fused_ce_compile=false"]
    try:
        recipe = load_recipe(base, overrides)
    except RecipeError as e:
        lines = str(e).splitlines()
        assert lines and all(line.strip().endswith((".", ")")) for line in lines), (base, overrides, str(e))
        return
    model, loss, grads = loss_and_grads(recipe)
    assert torch.isfinite(loss), (base, overrides)
    assert grads and all(torch.isfinite(g).all() for g in grads.values()), (base, overrides)
    if recipe.model.moe.n_experts and recipe.model.moe.backend != "loop":
        ref = load_recipe(base, overrides + ["model.moe.backend=loop"])
        _, ref_loss, ref_grads = loss_and_grads(ref, model.state_dict())
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (base, overrides, loss, ref_loss)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
