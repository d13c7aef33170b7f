"""Forward behaviour of the blocks on CPU: causality, windows, norms, RoPE, scaling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arch.attention import Attention, causal_mask, eager_attention
from arch.config import AttentionConfig, NormConfig, RopeConfig
from arch.norm import RMSNorm
from arch.rope import RoPE, apply_rope
from conftest import tiny_model, tiny_recipe


def test_tiny_forward(tiny_name):
    model = tiny_model(tiny_name)
    ids = torch.randint(0, 256, (2, 24))
    out = model(ids, targets=ids)
    assert out.logits.shape == (2, 24, 256)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_causal_model(tiny_name):
    """Changing token t changes no logit before t."""
    model = tiny_model(tiny_name)
    ids = torch.randint(0, 256, (1, 20))
    ids2 = ids.clone()
    ids2[0, 12:] = (ids2[0, 12:] + 1) % 256
    a, b = model(ids).logits, model(ids2).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12] - b[:, 12]).abs().max() > 1e-4


def _attention(window, impl="sdpa", softcap=None, n_kv=2, head_dim=8):
    cfg = AttentionConfig(n_heads=4, n_kv_heads=n_kv, head_dim=head_dim, qk_norm=True, impl=impl, softcap=softcap)
    torch.manual_seed(0)
    return Attention(32, cfg, NormConfig(), window).eval()


@pytest.mark.parametrize("impl", ["sdpa", "flex", "eager"])
@torch.no_grad()  # flex_attention has no CPU backward; gradients are compared elsewhere
def test_local_layer_ignores_keys_beyond_window(impl):
    W, T = 4, 16
    attn = _attention(W, impl)
    rope = RoPE(8, RopeConfig())(T, torch.device("cpu"))
    x = torch.randn(1, T, 32)
    y = attn(x, rope)
    for i in range(T):
        x2 = x.clone()
        x2[0, : max(0, i - W + 1)] = torch.randn_like(x2[0, : max(0, i - W + 1)])  # keys out of window
        torch.testing.assert_close(attn(x2, rope)[0, i], y[0, i], rtol=0, atol=1e-6)
        if i >= W:  # a key inside the window does matter
            x3 = x.clone()
            x3[0, i - W + 1] += 1.0
            assert (attn(x3, rope)[0, i] - y[0, i]).abs().max() > 1e-5


def test_window_mask_drawing():
    m = causal_mask(5, 3, "cpu").int()
    assert m.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_fast_attention_matches_eager(impl, window, n_kv, device="cpu", head_dim=8):
    a = _attention(window, impl, n_kv=n_kv, head_dim=head_dim).to(device)
    b = _attention(window, "eager", n_kv=n_kv, head_dim=head_dim).to(device)
    rope = RoPE(head_dim, RopeConfig())(12, torch.device(device))
    x = torch.randn(2, 12, 32, device=device, requires_grad=True)
    if impl == "flex" and device == "cpu":  # flex_attention has no CPU backward
        with torch.no_grad():
            torch.testing.assert_close(a(x, rope), b(x, rope), rtol=1e-5, atol=1e-6)
        return
    ya, yb = a(x, rope), b(x, rope)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(ya.square().sum(), [x, *a.parameters()])
    gb = torch.autograd.grad(yb.square().sum(), [x, *b.parameters()])
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 5])
def test_flex_matches_eager_on_cuda(window):
    torch.backends.cuda.matmul.allow_tf32 = False
    # CUDA flex compiles for head_dim >= 16 only
    test_fast_attention_matches_eager("flex", window, 2, device="cuda", head_dim=16)


def test_flex_head_dim_floor_on_cuda():
    """Below head_dim 16 CUDA flex cannot compile: auto takes SDPA / eager there, an
    explicit flex fails in one sentence; CPU flex has no such floor."""
    auto, flex = _attention(5, "auto"), _attention(5, "flex")
    assert auto._impl(12, is_cuda=True) == "sdpa" and flex._impl(12, is_cuda=False) == "flex"
    assert _attention(5, "auto", head_dim=16)._impl(12, is_cuda=True) == "flex"
    assert _attention(5, "auto", softcap=3.0)._impl(12, is_cuda=True) == "eager"
    with pytest.raises(ValueError, match="needs head_dim >= 16 on CUDA"):
        flex._impl(12, is_cuda=True)


def test_flex_softcap_matches_eager():
    a, b = _attention(5, "flex", softcap=3.0), _attention(5, "eager", softcap=3.0)
    rope = RoPE(8, RopeConfig())(12, torch.device("cpu"))
    x = torch.randn(2, 12, 32) * 3
    with torch.no_grad():
        torch.testing.assert_close(a(x, rope), b(x, rope), rtol=1e-5, atol=1e-6)


def test_softcap_matches_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 8) * 4, torch.randn(1, 2, 6, 8) * 4, torch.randn(1, 2, 6, 8)
    capped = eager_attention(q, k, v, 1.0, None, softcap=5.0)
    scores = 5.0 * torch.tanh((q @ k.transpose(-1, -2)) / 5.0)
    scores = scores.masked_fill(~causal_mask(6, None, "cpu"), float("-inf"))
    torch.testing.assert_close(capped, scores.softmax(-1) @ v)
    assert not torch.allclose(capped, eager_attention(q, k, v, 1.0, None, softcap=None))


def test_rmsnorm_flavours():
    x = torch.randn(3, 16)
    plain = RMSNorm(16, NormConfig(eps=1e-6))
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(plain(x), ref)
    gemma = RMSNorm(16, NormConfig(eps=1e-6, zero_centered=True, weight_in_float32=True))
    assert (gemma.weight == 0).all()  # (1 + w) with w = 0 at init
    torch.testing.assert_close(gemma(x), ref)
    with torch.no_grad():
        gemma.weight.fill_(0.5)
    torch.testing.assert_close(gemma(x), 1.5 * ref)
    # bf16: Gemma multiplies in float32 then rounds once; Qwen rounds, then multiplies
    xb = torch.randn(4, 64).bfloat16()
    w = torch.randn(64)
    g = RMSNorm(64, NormConfig(zero_centered=True, weight_in_float32=True))
    q = RMSNorm(64, NormConfig())
    with torch.no_grad():
        g.weight.copy_(w)
        q.weight.copy_(1 + w)
    g, q = g.bfloat16(), q.bfloat16()
    normed = xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(g(xb), (normed * (1 + g.weight.float())).bfloat16())
    assert torch.equal(q(xb), q.weight * normed.bfloat16())


def test_rope_linear_scaling_divides_positions():
    base = RoPE(8, RopeConfig(theta=100.0))
    scaled = RoPE(8, RopeConfig(theta=100.0, scaling="linear", factor=4.0))
    cos_b, _ = base(32, torch.device("cpu"))
    cos_s, _ = scaled(32, torch.device("cpu"))
    torch.testing.assert_close(cos_s[8], cos_b[2])  # position 8 / 4 == position 2
    # rotation preserves norms and relative positions give equal dot products
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 32, 8)
    cos, sin = base(32, torch.device("cpu"))
    r = apply_rope(q, cos, sin)
    torch.testing.assert_close(r.norm(dim=-1), q.norm(dim=-1))
    d1 = (r[0, 0, 5] * r[0, 0, 3]).sum()
    d2 = (r[0, 0, 12] * r[0, 0, 10]).sum()
    torch.testing.assert_close(d1, d2)


def test_gemma_embedding_scale_is_rounded_to_weight_dtype():
    model = tiny_model("gemma3", "model.d_model=5376", "model.n_layers=1", "model.attention.n_heads=1",
                       "model.attention.n_kv_heads=1", "model.ffn.d_ff=8").bfloat16()
    seen = {}
    model.layers[0].attn_norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    ids = torch.tensor([[3]])
    model(ids)
    expected = model.embed.weight[3] * torch.tensor(73.5, dtype=torch.bfloat16)  # not 73.32
    assert torch.tensor(math.sqrt(5376), dtype=torch.bfloat16).item() == 73.5
    assert torch.equal(seen["x"][0, 0], expected)


def test_per_layer_rope_and_windows_reach_the_layers():
    model = tiny_model("gemma3")
    kinds = [b.spec.kind for b in model.layers]
    assert kinds == ["local"] * 5 + ["global", "local"]
    assert [b.attn.window for b in model.layers] == [8] * 5 + [None, 8]
    assert model.ropes["local"].theta == 10_000 and model.ropes["global"].theta == 1e6
    assert model.layers[0].attn.scale == pytest.approx(24 ** -0.5)  # query_pre_attn_scalar
    # sandwich norms present, all four
    assert all(isinstance(getattr(model.layers[0], n), RMSNorm)
               for n in ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm"))
    qwen = tiny_model("qwen3")
    assert isinstance(qwen.layers[0].attn_post_norm, torch.nn.Identity)
    assert qwen.head is None and tiny_model("qwen3_moe").head is not None


def test_tied_head_shares_the_embedding():
    model = tiny_model("qwen3")
    assert model.head_weight() is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_layer_overrides_and_moe_placement():
    r = tiny_recipe("qwen3_moe", "model.n_layers=6", "model.moe.first_k_dense=1", "model.moe.every=2",
                    "model.layer_overrides.5.moe=false", "model.layer_overrides.2.moe=true")
    from arch.resolve import layer_specs
    assert [s.moe for s in layer_specs(r.model)] == [False, True, True, True, False, False]


def test_flex_block_masks_are_built_once_per_kind_outside_the_blocks(monkeypatch):
    """The model builds each layer kind's flex block mask once per forward and hands
    it to the blocks (inside a compiled block it would be rebuilt on every call); the
    output is the one each layer gets by building its own mask."""
    import arch.attention

    model = tiny_model("gemma3", "model.attention.impl=flex").eval()
    kinds = {b.spec.kind for b in model.layers}
    assert len(model.layers) > len(kinds) > 1  # several layers share a kind
    built, passed = [], []
    make, flex = Attention.block_mask, arch.attention.flex_attn
    monkeypatch.setattr(Attention, "block_mask", lambda self, T, d: built.append(self.window) or make(self, T, d))
    monkeypatch.setattr(arch.attention, "flex_attn", lambda *a: passed.append(a[6]) or flex(*a))  # a[6]: block_mask
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        logits = model(ids).logits
        assert len(built) == len(kinds) and len(passed) == len(model.layers)
        assert all(m is not None for m in passed)
        x = model.embed(ids) * torch.tensor(math.sqrt(model.cfg.d_model), dtype=model.embed.weight.dtype)
        for block in model.layers:  # each block builds its own mask
            x = block(x, model.ropes[block.spec.kind](24, "cpu"))
        reference = F.linear(model.norm(x), model.head_weight())
    if model.cfg.final_softcap is not None:
        reference = model.cfg.final_softcap * torch.tanh(reference / model.cfg.final_softcap)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
