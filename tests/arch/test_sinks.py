"""Attention sinks (gpt-oss): the eager path against transformers' gpt-oss attention."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from arch.attention import Attention, eager_attention
from arch.config import AttentionConfig, NormConfig


def _qkv(B=2, H=4, KV=2, T=7, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, KV, T, D, generator=g),
            torch.randn(B, KV, T, D, generator=g))


@pytest.mark.parametrize("window", [None, 3])
def test_sinks_match_transformers(window):
    pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = _qkv()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    T = q.shape[2]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))
    module = SimpleNamespace(sinks=sinks, num_key_value_groups=2, training=False)
    theirs, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.3)
    ours = eager_attention(q, k, v, 0.3, window, None, sinks).transpose(1, 2)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_a_sink_of_minus_infinity_is_no_sink_and_large_sinks_take_the_attention():
    q, k, v = _qkv(seed=1)
    plain = eager_attention(q, k, v, 0.3, None, None)
    assert torch.allclose(eager_attention(q, k, v, 0.3, None, None, torch.full((4,), float("-inf"))), plain)
    assert eager_attention(q, k, v, 0.3, None, None, torch.full((4,), 50.0)).abs().max() < 1e-12


def test_sinks_learn_and_force_the_eager_path():
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, sinks=True)
    attn = Attention(32, cfg, NormConfig(), window=None)
    assert attn.sinks.shape == (4,) and attn._impl(16, is_cuda=True) == "eager"
    x = torch.randn(2, 5, 32)
    cos, sin = torch.ones(5, 8), torch.zeros(5, 8)
    attn(x, (cos, sin)).sum().backward()
    assert attn.sinks.grad is not None and attn.sinks.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot add attention sinks"):
        Attention(32, AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, sinks=True, impl="sdpa"),
                  NormConfig(), window=None)._impl(16, is_cuda=False)
