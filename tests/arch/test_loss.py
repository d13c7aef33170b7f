"""The fused head + cross-entropy computes what the plain path computes."""
from __future__ import annotations

import pytest
import torch

from arch.loss import fused_linear_cross_entropy, plain_cross_entropy
from conftest import tiny_model


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk", [7, 64])
def test_fused_matches_plain(softcap, chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (50,))
    y[[3, 17, 49]] = -100  # ignored rows
    ref = plain_cross_entropy(h, w, y, softcap)
    got = fused_linear_cross_entropy(h, w, y, chunk=chunk, softcap=softcap)
    torch.testing.assert_close(got, ref.to(got.dtype))
    g_ref = torch.autograd.grad(ref * 3.0, [h, w])
    g_got = torch.autograd.grad(got * 3.0, [h, w])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


def test_fused_in_model_matches_plain(tiny_name):
    model = tiny_model(tiny_name, "model.fused_ce_chunk=16", "model.final_softcap=30.0")
    ids = torch.randint(0, 256, (2, 20))
    plain = model(ids, targets=ids)
    fused = model(ids, targets=ids, return_logits=False)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    g_plain = torch.autograd.grad(plain.loss, list(model.parameters()), allow_unused=True)
    g_fused = torch.autograd.grad(model(ids, targets=ids, return_logits=False).loss,
                                  list(model.parameters()), allow_unused=True)
    for a, b in zip(g_fused, g_plain):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_chunks_match_plain():
    """model.fused_ce_compile: each chunk's math through torch.compile, with a last
    chunk of another size (a second graph) and soft-capping, still equals the plain
    loss and its gradients."""
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (50,))
    y[[3, 17, 49]] = -100
    ref = plain_cross_entropy(h, w, y, 4.0)
    got = fused_linear_cross_entropy(h, w, y, chunk=16, softcap=4.0, compiled=True)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got * 3.0, [h, w]), torch.autograd.grad(ref * 3.0, [h, w])):
        torch.testing.assert_close(a, b)


def test_model_passes_the_compile_switch(monkeypatch):
    import arch.loss as loss_mod

    calls = []
    monkeypatch.setattr(loss_mod, "_compiled_chunk", lambda: lambda *a: calls.append(1) or
                        loss_mod._chunk_loss_and_grads(*a))
    model = tiny_model("qwen3", "model.fused_ce_chunk=16", "model.fused_ce_compile=true")
    ids = torch.randint(0, 256, (2, 20))
    model(ids, targets=ids, return_logits=False).loss.backward()
    assert len(calls) == 3  # 40 rows in chunks of 16


def test_compile_switch_needs_the_fused_loss():
    from arch.registry import RecipeError
    from conftest import tiny_recipe

    with pytest.raises(RecipeError, match="model.fused_ce_compile compiles the fused cross-entropy, which is off"):
        tiny_recipe("qwen3", "model.fused_ce_chunk=0", "model.fused_ce_compile=true")
    # left to auto (null), the chunk follows the switch: lit_modules/runtime.py resolve_speed
    assert tiny_recipe("qwen3", "model.fused_ce_compile=true").model.fused_ce_chunk is None


def test_body_only_forward_skips_the_head():
    model = tiny_model("qwen3_moe")
    out = model(torch.randint(0, 256, (1, 8)), return_logits=False)
    assert out.logits is None and out.loss is None
