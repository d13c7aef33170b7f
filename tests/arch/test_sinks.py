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


def test_sinks_learn_and_pick_their_path():
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, sinks=True)
    attn = Attention(32, cfg, NormConfig(), window=None)
    assert attn.sinks.shape == (4,) and attn._impl(16, is_cuda=False) == "eager"
    assert Attention(32, AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=16, sinks=True), NormConfig(),
                     window=None)._impl(16, is_cuda=True) == "flex"  # flex with the sink term through its lse
    assert attn._impl(16, is_cuda=True) == "eager"  # head_dim 8: too small for CUDA flex
    x = torch.randn(2, 5, 32)
    cos, sin = torch.ones(5, 8), torch.zeros(5, 8)
    attn(x, (cos, sin)).sum().backward()
    assert attn.sinks.grad is not None and attn.sinks.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot add attention sinks"):
        Attention(32, AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, sinks=True, impl="sdpa"),
                  NormConfig(), window=None)._impl(16, is_cuda=False)


def test_sdpa_with_sinks_is_refused_when_the_recipe_loads():
    from arch import RecipeError, load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe("proxies/gpt_oss_tiny", ["model.attention.impl=sdpa"])
    assert str(e.value) == ("model.attention.impl = 'sdpa' cannot add attention sinks; use impl 'auto', 'flex' "
                            "or 'eager' with model.attention.sinks.")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 5])
def test_flex_sinks_match_eager_cuda(window):
    """On CUDA, flex_attention with the sink term (through its logsumexp) gives the
    eager reference's output and gradients, sinks included."""
    from arch.attention import _block_mask, flex_attn

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 64, 16, device="cuda", generator=g, requires_grad=True) for h in (4, 2, 2))
    sinks = torch.randn(4, device="cuda", generator=g, requires_grad=True)
    out_g = torch.randn(2, 4, 64, 16, device="cuda", generator=g)
    inputs = (q, k, v, sinks)
    ref = eager_attention(q, k, v, 0.25, window, None, sinks)
    grads_ref = torch.autograd.grad((ref * out_g).sum(), inputs)
    out = flex_attn(q, k, v, 0.25, window, None, _block_mask(64, window, "cuda"), sinks)
    grads = torch.autograd.grad((out * out_g).sum(), inputs)
    assert torch.allclose(out, ref, atol=2e-5)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
