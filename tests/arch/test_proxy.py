"""Proxies keep the structure of the recipe they shrink."""
from __future__ import annotations

import pytest

from arch import build_model, count, load_recipe


def test_qwen3_moe_proxy_keeps_ratios():
    ref = load_recipe("qwen3/30b_a3b").model
    p = load_recipe("qwen3/30b_a3b", ["proxy.d_model=1024", "proxy.n_layers=12", "proxy.n_experts=64"]).model
    assert p.d_model == 1024 and p.n_layers == 12 and p.moe.n_experts == 64
    assert p.moe.top_k == ref.moe.top_k == 8
    assert p.attention.head_dim == ref.attention.head_dim
    assert p.attention.n_heads // p.attention.n_kv_heads == ref.attention.n_heads // ref.attention.n_kv_heads
    assert p.attention.n_heads * p.attention.head_dim / p.d_model == ref.attention.n_heads * 128 / ref.d_model
    assert p.moe.d_expert / p.d_model == ref.moe.d_expert / ref.d_model
    assert p.moe.router.renormalize and p.moe.balance.aux_scope == "global"
    model = build_model(p, "meta")
    assert sum(x.numel() for x in model.parameters()) == count(p).params_total


def test_gemma3_proxy_keeps_pattern_period_and_window_fraction():
    ref = load_recipe("gemma3/4b").model
    p = load_recipe("gemma3/4b", ["proxy.d_model=512", "proxy.n_layers=10", "proxy.max_seq_len=8192"]).model
    assert p.n_layers == 12  # a whole number of 6-layer periods
    kinds = count(p).layer_kinds
    assert kinds == (["local"] * 5 + ["global"]) * 2
    assert p.layer_kinds["local"].window / p.max_seq_len == ref.layer_kinds["local"].window / ref.max_seq_len
    assert p.ffn.d_ff / p.d_model == ref.ffn.d_ff / ref.d_model
    assert p.attention.n_heads // p.attention.n_kv_heads == 2
    assert p.attention.query_pre_attn_scalar == p.attention.head_dim  # the ratio 256/256 kept


def test_proxy_explicit_heads_override():
    p = load_recipe("qwen3/30b_a3b", ["proxy.d_model=512", "proxy.n_heads=8", "proxy.n_kv_heads=2",
                                      "proxy.head_dim=64"]).model
    assert (p.attention.n_heads, p.attention.n_kv_heads, p.attention.head_dim) == (8, 2, 64)


@pytest.mark.parametrize("first_k_dense, n_layers, kept", [(1, 4, 1), (3, 4, 1), (3, 2, 1), (12, 8, 2)])
def test_a_dense_prefix_survives_shrinking(first_k_dense, n_layers, kept):
    """DeepSeek-V3-like references (first_k_dense dense layers, then MoE) keep at least
    one dense layer and at least one MoE layer at any depth."""
    from arch.resolve import layer_specs

    recipe = load_recipe("qwen3/30b_a3b", [f"model.moe.first_k_dense={first_k_dense}", f"proxy.n_layers={n_layers}"])
    moe = [s.moe for s in layer_specs(recipe.model)]
    assert recipe.model.moe.first_k_dense == kept
    assert moe == [False] * kept + [True] * (n_layers - kept)


def test_inspect_says_what_the_proxy_changed():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lit_modules.cli", "inspect", "qwen3/30b_a3b", "proxy.d_model=768",
                        "proxy.n_layers=8", "model.moe.first_k_dense=2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("proxy"))
    for change in ("d_model 2048 -> 768", "n_layers 48 -> 8", "n_heads 32 -> 16", "first_k_dense 2 -> 1"):
        assert change in line, line
