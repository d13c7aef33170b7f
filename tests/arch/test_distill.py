"""The distillation losses (arch/distill.py): each kind against a hand computation,
`full` as KL plus the teacher's entropy, the sampled target's expectation, and the
chunked path's values and gradients against the plain one."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from arch.distill import KINDS, fused_distill_loss, plain_distill_loss, teacher_target

ZS = [1.0, -0.5, 2.0, 0.0, 0.3]  # one token's student logits
ZT = [0.2, 1.5, 2.5, -1.0, 0.0]  # the teacher's


def _one_token(z):
    """h = logits and w = identity, so that h @ w.T are the given logits."""
    return torch.tensor([z], dtype=torch.float64), torch.eye(len(z), dtype=torch.float64)


def _softmax(z, tau=1.0):
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _hand_loss(target, tau):
    logq = [math.log(q) for q in _softmax(ZS, tau)]
    return tau * tau * -sum(p * lq for p, lq in zip(target, logq))


def _loss(kind, k, tau, generator=None, fused=True):
    h_s, w_s = _one_token(ZS)
    h_t, w_t = _one_token(ZT)
    y = torch.tensor([2])
    fn = fused_distill_loss if fused else plain_distill_loss
    return fn(h_s, w_s, h_t, w_t, y, kind, k=k, temperature=tau, alpha=1.0, generator=generator)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_full_by_hand(tau):
    got = _loss("full", 256, tau)["distill"]
    assert float(got) == pytest.approx(_hand_loss(_softmax(ZT, tau), tau), rel=1e-6)


def test_topk_by_hand():
    p = _softmax(ZT, 1.5)
    top = sorted(range(5), key=lambda i: -p[i])[:2]  # ids 2 and 1
    target = [p[i] / (p[top[0]] + p[top[1]]) if i in top else 0.0 for i in range(5)]
    assert top == [2, 1]
    assert float(_loss("topk", 2, 1.5)["distill"]) == pytest.approx(_hand_loss(target, 1.5), rel=1e-6)


def test_sampled_by_hand():
    # the same draws as the loss makes: k ids with replacement from softmax(z_t / tau)
    p = _softmax(ZT, 2.0)
    draws = torch.multinomial(torch.tensor([p]), 6, replacement=True,
                              generator=torch.Generator().manual_seed(3))[0].tolist()
    counts = Counter(draws)
    # sampled_counts: how often each id came up, over k
    target = [counts[i] / 6 for i in range(5)]
    got = _loss("sampled_counts", 6, 2.0, generator=torch.Generator().manual_seed(3))["distill"]
    assert float(got) == pytest.approx(_hand_loss(target, 2.0), rel=1e-6)
    # sampled (Gemma 3): the teacher's probabilities on the distinct ids drawn, renormalised
    kept = sum(p[i] for i in counts)
    target = [p[i] / kept if i in counts else 0.0 for i in range(5)]
    assert len(counts) < 5  # some id was never drawn, so the two targets differ
    got = _loss("sampled", 6, 2.0, generator=torch.Generator().manual_seed(3))["distill"]
    assert float(got) == pytest.approx(_hand_loss(target, 2.0), rel=1e-6)


def test_full_is_kl_plus_teacher_entropy():
    torch.manual_seed(0)
    h_s, w_s = torch.randn(30, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    h_t, w_t = torch.randn(30, 12, dtype=torch.float64), torch.randn(20, 12, dtype=torch.float64)
    y = torch.randint(0, 20, (30,))
    got = fused_distill_loss(h_s, w_s, h_t, w_t, y, "full", alpha=1.0, chunk=7)["distill"]
    log_p = torch.log_softmax(h_t @ w_t.T, -1)
    log_q = torch.log_softmax(h_s @ w_s.T, -1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    torch.testing.assert_close(got.double(), kl + entropy, rtol=1e-5, atol=1e-6)


def test_sampled_target_expectation_is_the_teacher_distribution():
    """Seeded: over many draws, the mean target is within 5 standard errors of p at
    every id (an id's target c/k has variance p(1-p)/k)."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01])
    z = p.log().expand(20_000, -1)  # 20,000 tokens with the same teacher distribution
    k = 4
    mean = teacher_target(z, "sampled_counts", k, 1.0, torch.Generator().manual_seed(0)).mean(0)
    se = (p * (1 - p) / k / z.shape[0]).sqrt()
    assert ((mean - p).abs() < 5 * se).all(), (mean, p)


def test_renormalised_sampled_target_expectation():
    """Gemma 3's target is biased toward the teacher's mode, by exactly the amount an
    enumeration gives: p = (0.9, 0.1), k = 2 draws: P_0 = 1 when both draws are id 0
    (0.81), 0.9 when the draws differ (0.18), 0 when both are id 1: E = 0.972. Seeded:
    the mean over 20,000 tokens is within 5 standard errors of it, and far from 0.9."""
    p = torch.tensor([0.9, 0.1])
    z = p.log().expand(20_000, -1)
    mean = teacher_target(z, "sampled", 2, 1.0, torch.Generator().manual_seed(0)).mean(0)
    exact = 0.81 * 1.0 + 0.18 * 0.9
    sd = (0.81 * (1 - exact) ** 2 + 0.18 * (0.9 - exact) ** 2 + 0.01 * exact ** 2) ** 0.5
    se = sd / z.shape[0] ** 0.5
    assert abs(float(mean[0]) - exact) < 5 * se < 0.01 and float(mean[0]) > 0.95


@pytest.mark.parametrize("kind", KINDS)
def test_targets_are_distributions(kind):
    z = torch.randn(9, 50)
    t = teacher_target(z, kind, 7, 1.3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(t.sum(-1), torch.ones(9))
    assert (t >= 0).all()
    if kind != "full":
        assert ((t > 0).sum(-1) <= 7).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0])
def test_chunked_values_and_gradients_match_plain(kind, softcap, alpha):
    torch.manual_seed(0)
    N, V = 40, 33
    h_s = torch.randn(N, 16, dtype=torch.float64, requires_grad=True)
    # heads padded past the shared vocabulary V (by 2 and by 3 rows): the distributions cover V
    w_s = torch.randn(V + 2, 16, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(N, 24, dtype=torch.float64), torch.randn(V + 3, 24, dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    y[[2, 30]] = -100  # ignored rows count in neither loss
    kw = dict(k=5, temperature=1.7, alpha=alpha, softcap_s=softcap, softcap_t=2.0, vocab=V)
    # sampled: one chunk, so both paths draw in the same order from the same generator
    chunk = N if kind.startswith("sampled") else 7
    ref = plain_distill_loss(h_s, w_s, h_t, w_t, y, kind, generator=torch.Generator().manual_seed(5), **kw)
    got = fused_distill_loss(h_s, w_s, h_t, w_t, y, kind, chunk=chunk, generator=torch.Generator().manual_seed(5),
                             **kw)
    for key in ("loss", "distill", "ce", "teacher_ce"):
        torch.testing.assert_close(got[key].double(), ref[key].double(), rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got["loss"] * 3, [h_s, w_s]), torch.autograd.grad(ref["loss"] * 3, [h_s, w_s])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_is_tau_times_q_minus_target():
    """d(tau^2 H(P, softmax(z / tau))) / dz = tau (softmax(z / tau) - P), by hand."""
    z = torch.tensor([ZS], dtype=torch.float64, requires_grad=True)
    h_t, w_t = _one_token(ZT)
    out = fused_distill_loss(z, torch.eye(5, dtype=torch.float64), h_t, w_t, torch.tensor([0]), "full",
                             temperature=2.0, alpha=1.0)
    (g,) = torch.autograd.grad(out["loss"], [z])
    expect = 2.0 * (torch.tensor(_softmax(ZS, 2.0)) - torch.tensor(_softmax(ZT, 2.0)))
    torch.testing.assert_close(g[0].float(), expect.float(), rtol=1e-5, atol=1e-6)


def test_no_gradient_without_grad_and_unknown_kind():
    h = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        out = fused_distill_loss(h, torch.randn(10, 8), torch.randn(4, 8), torch.randn(10, 8),
                                 torch.zeros(4, dtype=torch.long), "topk", k=3)
    assert not out["loss"].requires_grad
    with pytest.raises(ValueError, match="not one of"):
        fused_distill_loss(h, torch.randn(10, 8), h, torch.randn(10, 8), torch.zeros(4, dtype=torch.long), "kl")


def test_bf16_teacher_and_autocast_student():
    """The GPU layout on a CPU: the student under bf16 autocast (float32 weights), the
    teacher's hidden states and head in bf16 (a float32 hidden state too): the loss
    and gradients stay near the float32 ones."""
    torch.manual_seed(0)
    h_s = torch.randn(24, 16, requires_grad=True)
    w_s = torch.randn(40, 16, requires_grad=True)
    h_t, w_t = torch.randn(24, 8), torch.randn(40, 8)
    y = torch.randint(0, 40, (24,))
    ref = fused_distill_loss(h_s, w_s, h_t, w_t, y, "full", alpha=0.5, chunk=10)
    g_ref = torch.autograd.grad(ref["loss"], [h_s, w_s])
    for teacher_h in (h_t.bfloat16(), h_t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused_distill_loss(h_s, w_s, teacher_h, w_t.bfloat16(), y, "full", alpha=0.5, chunk=10)
        assert got["loss"].dtype == torch.float32
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=3e-2, atol=3e-2)
        for a, b in zip(torch.autograd.grad(got["loss"], [h_s, w_s]), g_ref):
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
