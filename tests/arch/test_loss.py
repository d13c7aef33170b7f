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
