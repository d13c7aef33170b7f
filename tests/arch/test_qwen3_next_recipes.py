"""The Qwen3-Next and Qwen3.5-MoE recipes count what transformers' own models hold,
built on the meta device from the published configurations (exactly, well inside the
issue's 0.5%), and the proxies keep the hybrid structure."""
from __future__ import annotations

import pytest
import torch

from arch import available_recipes, count, load_recipe
from arch.resolve import layer_specs

# config.json of Qwen/Qwen3-Next-80B-A3B-Instruct as transformers reads it (the rest:
# Qwen3NextConfig's defaults, which are that model's); Qwen3.5-35B-A3B: the defaults of
# Qwen3_5MoeTextConfig, documented as that checkpoint's
HF_CONFIGS = {
    "qwen3_next/80b_a3b": ("Qwen3NextConfig", dict(intermediate_size=5120, max_position_embeddings=262144,
                                                   rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                                    "partial_rotary_factor": 0.25})),
    "qwen3_5/35b_a3b": ("Qwen3_5MoeTextConfig", dict(max_position_embeddings=262144,
                                                     rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                                      "partial_rotary_factor": 0.25})),
}


def test_recipes_present():
    recipes = available_recipes()
    for name in list(HF_CONFIGS) + ["proxies/qwen3_next_tiny", "proxies/qwen3_next_w2"]:
        assert name in recipes


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_counts_equal_transformers_own_model(name):
    transformers = pytest.importorskip("transformers")
    cls, fields = HF_CONFIGS[name]
    cfg = getattr(transformers, cls)(**fields)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    acc = count(load_recipe(name).model)
    assert sum(p.numel() for p in hf.parameters()) == acc.params_total
    specs = layer_specs(load_recipe(name).model)
    assert [("linear" if s.attention == "gated_deltanet" else "full") + "_attention" for s in specs] == cfg.layer_types
    # active: what one token touches, HF's experts minus the ones it is not routed to
    moe = [m for m in hf.modules() if type(m).__name__.endswith("SparseMoeBlock")]
    per_expert = sum(p[0].numel() for p in (moe[0].experts.gate_up_proj, moe[0].experts.down_proj))
    idle = len(moe) * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    assert acc.params_active == acc.params_total - idle


@pytest.mark.parametrize("name, total", [("qwen3_next/80b_a3b", 80e9), ("qwen3_5/35b_a3b", 35e9)])
def test_totals_round_to_the_names(name, total):
    """80B and 35B, to the digits the names give (their "A3B" is looser: 3.25B and 2.44B
    active without embedding and head, 3.87B and 3.45B with them)."""
    assert abs(count(load_recipe(name).model).params_total - total) < 0.5e9


def test_proxies_keep_the_hybrid_structure():
    for name in ("proxies/qwen3_next_tiny", "proxies/qwen3_next_w2"):
        m = load_recipe(name).model
        kinds = [s.attention for s in layer_specs(m)]
        assert kinds[:4] == ["gated_deltanet"] * 3 + ["gqa"] and all(s.moe for s in layer_specs(m))
        assert m.attention.output_gate and m.norm.zero_centered and m.moe.shared_gate
        assert m.layer_kinds["global"].rope.partial == 0.25


def test_derived_proxy_scales_the_deltanet_heads():
    import experts  # noqa: F401
    from arch import build_model

    ref = load_recipe("qwen3_next/80b_a3b").model
    m = load_recipe("qwen3_next/80b_a3b", ["proxy.d_model=512", "proxy.n_layers=8", "proxy.n_experts=16"]).model
    lin, ref_lin = m.attention.linear, ref.attention.linear
    assert lin.n_k_heads == ref_lin.n_k_heads * 512 // ref.d_model
    assert lin.n_v_heads // lin.n_k_heads == ref_lin.n_v_heads // ref_lin.n_k_heads
    assert (lin.k_head_dim, lin.v_head_dim) == (ref_lin.k_head_dim, ref_lin.v_head_dim)
    assert [s.attention for s in layer_specs(m)] == (["gated_deltanet"] * 3 + ["gqa"]) * 2
    acc = count(m)  # the MTP layer (depth 1, as the release's) is counted apart
    assert m.mtp.depth == 1 and acc.params_mtp > 0
    assert sum(p.numel() for p in build_model(m, device="meta").parameters()) == acc.params_total + acc.params_mtp
