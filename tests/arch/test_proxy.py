"""Proxies keep the structure of the recipe they shrink."""
from __future__ import annotations

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
