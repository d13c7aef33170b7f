"""Gated DeltaNet (arch/linear_attention.py): the chunked delta rule against the plain
per-token recurrence, the layer's causality and training, what the recipe refuses, and
how `count` prices it (FLOPs linear in the context, a state of fixed size)."""
from __future__ import annotations

import pytest
import torch

from arch import build_model, count, load_recipe
from arch.linear_attention import chunk_gated_delta_rule, fla_chunk_gated_delta_rule, l2norm, \
    recurrent_gated_delta_rule
from arch.registry import RecipeError

TINY = "proxies/qwen3_next_tiny"


def _inputs(B=2, T=37, H=3, Dk=8, Dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(B, T, H, Dk, generator=g, dtype=dtype))
    k = l2norm(torch.randn(B, T, H, Dk, generator=g, dtype=dtype))
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    # decays from ~0 (keep) to strongly forgetting, as -exp(A_log) softplus(...) gives
    decay = -torch.rand(B, T, H, generator=g, dtype=dtype) * 3
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    return q, k, v, decay, beta


@pytest.mark.parametrize("T", [1, 17, 50])
@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_chunked_equals_recurrent_float64(T, chunk):
    q, k, v, g, beta = _inputs(T=T)
    S0 = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, 0.4, initial_state=S0)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, 0.4, chunk, initial_state=S0)
    assert o.dtype == torch.float64 and o.shape == (2, T, 3, 6)
    assert (o - o_ref).abs().max() < 1e-12 and (s - s_ref).abs().max() < 1e-12


def test_chunked_equals_recurrent_float32_and_gradients():
    q, k, v, g, beta = (t.float().requires_grad_() for t in _inputs(T=29, seed=1))
    o_ref, _ = recurrent_gated_delta_rule(q, k, v, g, beta, 0.35)
    grads_ref = torch.autograd.grad(o_ref.square().sum(), (q, k, v, g, beta))
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, 0.35, 8)
    grads = torch.autograd.grad(o.square().sum(), (q, k, v, g, beta))
    assert (o - o_ref).abs().max() < 1e-5
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())


def test_the_delta_rule_overwrites_what_a_key_stored():
    """beta = 1, no decay: writing v2 under the same key replaces v1 (the delta rule's
    point; plain linear attention would return v1 + v2)."""
    k = l2norm(torch.randn(1, 1, 1, 4, dtype=torch.float64)).expand(1, 2, 1, 4)
    v = torch.randn(1, 2, 1, 3, dtype=torch.float64)
    o, _ = chunk_gated_delta_rule(k, k, v, torch.zeros(1, 2, 1, dtype=torch.float64),
                                  torch.ones(1, 2, 1, dtype=torch.float64), 1.0, 2)
    assert torch.allclose(o[0, 1, 0], v[0, 1, 0] * (k[0, 0, 0] @ k[0, 0, 0]), atol=1e-6)


def _tiny(*extra, seed=0):
    torch.manual_seed(seed)
    return build_model(load_recipe(TINY, list(extra)).model, device="cpu")


def test_layer_is_causal_and_every_parameter_trains():
    import experts  # noqa: F401  (registers the MoE layer)

    model = _tiny("model.attention.linear.chunk_size=8")
    ids = torch.randint(0, 2048, (2, 30), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[:, 20:] = (later[:, 20:] + 1) % 2048
    with torch.no_grad():
        a, b = model(ids).logits, model(later).logits
    # not bit-equal: a changed later token changes the experts' group sizes, and with
    # several threads a GEMM's rounding may follow its shape
    assert torch.allclose(a[:, :20], b[:, :20], rtol=0, atol=1e-5)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-2
    model.train()
    out = model(ids, targets=ids)
    (out.loss + out.aux["aux_loss"]).backward()
    attn = model.layers[0].attn
    for name in ("A_log", "dt_bias", "conv1d.weight", "in_proj_qkv.weight", "in_proj_a.weight", "norm.weight",
                 "out_proj.weight"):
        grad = attn.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert model.layers[3].attn.q_proj.weight.shape[0] == 2 * 4 * 32  # the output gate's half


def test_a_few_steps_lower_the_loss():
    import experts  # noqa: F401

    model = _tiny("model.vocab_size=64").train()
    ids = torch.arange(64).repeat(2, 1)[:, :48]  # a sequence it can learn
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("pieces", [[5, 1, 1, 9, 1, 2, 1, 1, 1], [1] * 22], ids=["chunks-and-steps", "steps"])
def test_cached_decoding_equals_the_full_forward(pieces):
    """arch/cache.py's StateCache: the convolution's last inputs and the recurrent state
    carried from piece to piece (prompt chunks longer than chunk_size 4 take the chunked
    path from the cached state, shorter ones the per-token one) give the full forward's logits."""
    import experts  # noqa: F401
    from arch.cache import KVCache, StateCache
    from arch.generate import dropless

    model = _tiny("model.attention.linear.chunk_size=4", seed=3).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # zero-centred norms start at 0: make them matter
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 2048, (2, 22), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), dropless(model):
        full = model(ids).logits
        cache = KVCache.for_model(model, 22)
        out, i = [], 0
        for n in pieces:
            assert cache.pos == i
            out.append(model(ids[:, i:i + n], cache=cache).logits)
            i += n
    torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=1e-5, atol=2e-5)
    states = [c for c in cache.layers if isinstance(c, StateCache)]
    assert len(states) == 3 and states[0].state.shape == (2, 4, 32, 32) and states[0].conv.shape[-1] == 3
    with pytest.raises(ValueError, match="made for 22 positions"):
        model(ids[:, :1], cache=cache)


def test_document_masks_are_refused_in_one_sentence():
    import experts  # noqa: F401

    model = _tiny()
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="document_mask off"):
        model(ids, doc_ids=torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("override, needle", [
    ("model.attention.linear.n_v_heads=3", r"n_v_heads \(3\) is not divisible by n_k_heads"),
    ("model.layer_kinds.linear.attention=gated_deltanett", r"did you mean 'gated_deltanet'\?"),
    ("model.attention.linear.backend=triton", "model.attention.linear.backend = 'triton' is not valid"),
    ("model.attention.linear.conv_kernel=0", "model.attention.linear.conv_kernel"),
])
def test_bad_linear_attention_fields_are_refused(override, needle):
    with pytest.raises(RecipeError, match=needle):
        load_recipe(TINY, [override])


@pytest.mark.skipif(fla_chunk_gated_delta_rule() is not None, reason="flash-linear-attention is installed")
def test_fla_backend_without_fla_is_one_sentence():
    with pytest.raises(RecipeError, match="needs flash-linear-attention"):
        _tiny("model.attention.linear.backend=fla")


def test_count_prices_the_linear_layers_linear_in_context():
    recipe = load_recipe(TINY)
    m, lin = recipe.model, recipe.model.attention.linear
    short, long = count(m, seq_len=256, context=256), count(m, seq_len=1024, context=1024)
    n_lin = short.n_linear_layers
    assert n_lin == 3 and short.n_layers == 4
    # only the full layer's attention grows with the context
    a = m.attention
    full_growth = 6 * a.n_heads * 2 * a.head_dim * ((1024 + 1) / 2 - (256 + 1) / 2)
    assert long.attention_flops_per_token - short.attention_flops_per_token == pytest.approx(full_growth)
    # the state does not grow: fp32 recurrent state + bf16 convolution inputs per DeltaNet layer
    conv = 2 * lin.n_k_heads * lin.k_head_dim + lin.n_v_heads * lin.v_head_dim
    state = n_lin * (4 * lin.n_v_heads * lin.k_head_dim * lin.v_head_dim + 2 * conv * (lin.conv_kernel - 1))
    assert short.linear_state_bytes == long.linear_state_bytes == state
    kv = 2 * 2 * a.n_kv_heads * a.head_dim  # k and v, bf16, the one full layer
    assert short.kv_bytes_per_token == kv
    assert long.kv_bytes_at_context == kv * 1024 + state
