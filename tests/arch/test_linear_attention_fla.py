"""flash-linear-attention's chunked kernel (model.attention.linear.backend fla / auto on
CUDA) against the chunked PyTorch reference. GPU only: skips without CUDA or fla."""
from __future__ import annotations

import pytest
import torch

from arch.linear_attention import chunk_gated_delta_rule, fla_chunk_gated_delta_rule, l2norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or fla_chunk_gated_delta_rule() is None,
                                reason="needs CUDA and flash-linear-attention (pip install 'moelab[fla]')")


def _inputs(B, T, H, Dk, Dv, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, Dk, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, T, H, Dk, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, T, H, Dv, device="cuda", generator=g).bfloat16()
    decay = -torch.rand(B, T, H, device="cuda", generator=g) * 2  # float32, as the layer makes it
    beta = torch.rand(B, T, H, device="cuda", generator=g).bfloat16()
    return q, k, v, decay, beta


@pytest.mark.parametrize("T", [64, 200, 1000])
def test_fla_matches_the_chunked_reference(T):
    q, k, v, g, beta = (t.requires_grad_() for t in _inputs(2, T, 4, 64, 64))
    scale = 64 ** -0.5
    fla = fla_chunk_gated_delta_rule()
    o, _ = fla(q, k, v, g=g, beta=beta, scale=scale, use_qk_l2norm_in_kernel=True)
    ref, _ = chunk_gated_delta_rule(l2norm(q.float()), l2norm(k.float()), v, g, beta, scale, 64)
    err = (o.float() - ref).abs().max().item()
    assert err < 2e-2 * max(1.0, ref.abs().max().item()), err
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((o.float() * w).sum(), (q, k, v, g, beta))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v, g, beta))
    for name, a, b in zip("q k v g beta".split(), grads, grads_ref):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < 3e-2, (name, rel.item())


@pytest.mark.parametrize("mixed", [False, True], ids=["bf16-weights", "bf16-autocast"])
def test_layer_backends_agree_in_bf16(mixed):
    """The whole Qwen3-Next tiny proxy on CUDA, bf16 weights or float32 weights under bf16
    autocast (training's bf16-mixed, where q, k and v arrive in float32): fla against torch."""
    import experts  # noqa: F401
    from arch import build_model, load_recipe

    logits = {}
    for backend in ("torch", "fla"):
        torch.manual_seed(0)
        recipe = load_recipe("proxies/qwen3_next_tiny", [f"model.attention.linear.backend={backend}"])
        model = build_model(recipe.model, device="cuda")
        model = model if mixed else model.bfloat16()
        ids = torch.randint(0, 2048, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed):
            logits[backend] = model(ids).logits.float()
    diff = (logits["fla"] - logits["torch"]).abs().max().item()
    assert diff < 5e-2 * logits["torch"].abs().max().item(), diff
