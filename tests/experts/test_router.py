"""router.fast_logits: with bf16 input and weight, the float32 logits come from
matmuls of bf16 operands accumulating in float32 (_LowPrecisionLogits); they must be
the float32 matmul's logits, and their gradients the float64 gradients rounded once."""
from __future__ import annotations

import pytest
import torch

import experts.router as router_mod
from experts.router import _LowPrecisionLogits
from moe_helpers import make_moe


def _bf16_router(fast: bool):
    layer = make_moe(seed=0, d_model=64, n_experts=16, top_k=4)
    router = layer.router.to(torch.bfloat16)
    router.fast_logits = fast
    return router


def test_fast_logits_take_the_fast_path_and_match_float32(monkeypatch):
    calls = []
    apply = _LowPrecisionLogits.apply
    monkeypatch.setattr(_LowPrecisionLogits, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(96, 64).bfloat16()
    fast, plain = _bf16_router(True)(x), _bf16_router(False)(x)
    assert calls == [1]  # bf16 input and weight: the fast path
    assert fast.logits_TE.dtype == torch.float32
    torch.testing.assert_close(fast.logits_TE, plain.logits_TE, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast.ids_TK, plain.ids_TK)
    # a float32 input (bf16-mixed: fp32 residual stream) keeps the float32 matmul
    _bf16_router(True)(x.float())
    assert calls == [1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_fast_logits_gradients_are_the_float64_ones_rounded_once(device):
    """hi + lo split of the float32 gradient: the bf16 gradients equal the float64
    ones rounded to bf16 except where the two roundings straddle a tie (measured
    0.2%); without the lo half, ~40% of the elements differ."""
    torch.manual_seed(0)
    T, D, E = 512, 256, 64
    x = torch.randn(T, D, device=device).bfloat16().requires_grad_()
    w = (0.05 * torch.randn(E, D, device=device)).bfloat16().requires_grad_()
    logits = _LowPrecisionLogits.apply(x, w)
    g = 1e-3 * torch.randn(T, E, device=device).softmax(-1)
    grad_x, grad_w = torch.autograd.grad(logits, (x, w), g)
    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()
    torch.testing.assert_close(logits.double(), x64 @ w64.T, rtol=1e-6, atol=1e-6)
    for got, want in ((grad_x, g64 @ w64), (grad_w, g64.T @ x64)):
        assert got.dtype == torch.bfloat16
        mismatch = (got != want.to(torch.bfloat16)).float().mean().item()
        assert mismatch < 0.02, mismatch


def test_cuda_matmul_is_used_only_on_cuda():
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(8, 3).bfloat16()
    out = router_mod._mm_float32(a, b)
    assert out.dtype == torch.float32 and torch.equal(out, a.float() @ b.float())


def test_fp16_keeps_the_float32_matmul(monkeypatch):
    """fp16's range would flush the low half of small gradients: no fast path."""
    calls = []
    apply = _LowPrecisionLogits.apply
    monkeypatch.setattr(_LowPrecisionLogits, "apply", lambda *a: calls.append(1) or apply(*a))
    router = make_moe(seed=0, d_model=64, n_experts=16, top_k=4).router.to(torch.float16)
    router(torch.randn(8, 64).half())
    assert calls == []


def test_topk_softmax_router_matches_transformers_gpt_oss():
    """top-k of the logits (with the learned router bias), then a softmax over the k:
    transformers' GptOssTopKRouter, same weights; the balancing probabilities are the
    softmax over all experts."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    layer = make_moe(seed=3, router="topk_softmax", n_experts=8, top_k=3, d_model=16)
    assert layer.router.gate.bias is None  # moe_helpers builds it without; give it one
    layer.router.gate.bias = torch.nn.Parameter(torch.randn(8))
    cfg = transformers.GptOssConfig(num_local_experts=8, num_experts_per_tok=3, hidden_size=16)
    theirs = GptOssTopKRouter(cfg)
    with torch.no_grad():
        theirs.weight.copy_(layer.router.gate.weight)
        theirs.bias.copy_(layer.router.gate.bias)
    x = torch.randn(20, 16)
    r = layer.router(x)
    logits, weights, ids = theirs(x)
    assert torch.equal(r.ids_TK, ids)
    assert torch.allclose(r.weights_TK, weights, atol=1e-6) and torch.allclose(r.weights_TK.sum(-1), torch.ones(20))
    assert torch.allclose(r.probs_TE, logits.softmax(-1), atol=1e-6)


@pytest.mark.parametrize("bias_update_rate", [0.0, 0.01])
def test_group_limited_routing_matches_transformers_deepseek_v3(bias_update_rate):
    """sigmoid scores, the correction (selection) bias, 4 groups of 4 scored by their two
    best, the 2 best groups kept, top-3, renormalised, scaled by 2.5: transformers'
    DeepseekV3TopkRouter with the same weights and bias gives the same experts and weights."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    layer = make_moe(seed=4, router="sigmoid_topk", n_experts=16, top_k=3, d_model=16,
                     bias_update_rate=bias_update_rate)
    layer.router.n_group, layer.router.topk_group, layer.router.route_scale = 4, 2, 2.5
    if bias_update_rate:
        layer.router.expert_bias.copy_(torch.randn(16) * 0.5)
    cfg = transformers.DeepseekV3Config(n_routed_experts=16, num_experts_per_tok=3, hidden_size=16, n_group=4,
                                        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    theirs = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        theirs.weight.copy_(layer.router.gate.weight)
        theirs.e_score_correction_bias.copy_(layer.router.expert_bias)
    x = torch.randn(40, 16)
    r = layer.router(x)
    _, weights, ids = theirs(x)
    # the same experts (in any order), each with the same weight
    order_o, order_t = r.ids_TK.argsort(-1), ids.argsort(-1)
    assert torch.equal(r.ids_TK.gather(-1, order_o), ids.gather(-1, order_t))
    assert torch.allclose(r.weights_TK.gather(-1, order_o), weights.gather(-1, order_t), atol=1e-6)
    # the groups really limit the choice: unlimited top-3 picks differ for some token
    layer.router.n_group = 1
    assert not torch.equal(layer.router(x).ids_TK.sort(-1).values, r.ids_TK.sort(-1).values)


@pytest.mark.parametrize("n_experts", [8, 128, 129, 256])
@pytest.mark.parametrize("k", [1, 8])
def test_top_k_ids_pick_what_torch_topk_picks(n_experts, k):
    """Both forms of top_k_ids (a row sort up to SORT_TOP_K_MAX_EXPERTS experts, topk
    above) give torch.topk's values in the same order, and ties go to the lower id
    on the sort path."""
    from experts.router import SORT_TOP_K_MAX_EXPERTS, top_k_ids

    torch.manual_seed(n_experts + k)
    scores = torch.randn(64, n_experts).softmax(-1)
    ids = top_k_ids(scores, k)
    assert ids.shape == (64, k)
    assert torch.equal(scores.gather(-1, ids), scores.topk(k, dim=-1).values)
    if n_experts <= SORT_TOP_K_MAX_EXPERTS:
        tied = torch.zeros(3, n_experts)
        assert top_k_ids(tied, k).tolist() == [list(range(k))] * 3
