"""Auxiliary-loss-free balancing: bias updates alone even out a skewed router."""
from __future__ import annotations

import pytest
import torch

from experts.layers import update_router_biases
from experts.stats import expert_load, router_stats
from moe_helpers import D_MODEL, make_moe


def _skewed_layer(router, rate):
    layer = make_moe(n_experts=8, top_k=2, router=router, bias_update_rate=rate, aux_coef=0.0).train()
    with torch.no_grad():  # experts 0 and 1 score high on the inputs' common direction
        layer.router.gate.weight.normal_(std=0.3)
        layer.router.gate.weight[:2] += 0.3
    return layer


def _batch(gen):
    return torch.randn(256, D_MODEL, generator=gen) + 0.5


@pytest.mark.parametrize("router,rate", [("softmax_topk", 0.005), ("sigmoid_topk", 0.005)])
def test_bias_updates_balance_a_skewed_router(router, rate):
    layer = _skewed_layer(router, rate)
    gen = torch.Generator().manual_seed(0)
    loads = []
    with torch.no_grad():
        for _ in range(300):
            layer(_batch(gen))
            loads.append(layer.stats["load_max_over_mean"].item())
            update_router_biases(layer)
    start, end = loads[0], sum(loads[-20:]) / 20
    assert start > 2.5, "the router is not skewed enough for the test to mean anything"
    assert end < 1.5 and end < 0.5 * start, (start, end)
    assert layer.stats["bias_norm"].item() > 0
    assert layer.aux == {}  # no loss was involved


def test_without_updates_the_skew_stays():
    layer = _skewed_layer("softmax_topk", 0.005)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer(_batch(gen))
        first = layer.stats["load_max_over_mean"].item()
        for _ in range(20):
            layer(_batch(gen))
    assert first > 2.5 and layer.stats["load_max_over_mean"].item() > 0.8 * first


def test_update_uses_loads_since_the_last_update_and_selection_only():
    layer = _skewed_layer("softmax_topk", 0.01)
    x = _batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x)
        layer(x)
        counts = layer.stats["tokens_per_expert"]
        loads = update_router_biases(layer)
        torch.testing.assert_close(loads[0], 2 * counts)  # two forwards accumulated
        expected = 0.01 * torch.sign(counts.float().mean() - counts.float())
        torch.testing.assert_close(layer.router.expert_bias, expected)
        assert update_router_biases(layer).sum() == 0  # reset after use
        layer.eval()
        layer(x)  # evaluation forwards do not count
        assert update_router_biases(layer).sum() == 0
        # the bias changes which experts are chosen, not the weights they get
        r = layer.router(x)
        torch.testing.assert_close(r.weights_TK, r.scores_TE.gather(-1, r.ids_TK) /
                                   r.scores_TE.gather(-1, r.ids_TK).sum(-1, keepdim=True))


def test_stats_and_expert_load_image():
    layer = _skewed_layer("softmax_topk", 0.01)
    assert router_stats(layer) == {}  # no forward yet
    layer(_batch(torch.Generator().manual_seed(2)))
    stats = router_stats(layer)["moe"]
    assert set(stats) == {"tokens_per_expert", "load_max_over_mean", "dropped_tokens", "entropy",
                          "aux_loss", "z_loss", "bias_norm"}
    assert stats["tokens_per_expert"].sum().item() == 256 * 2
    load = expert_load(layer)
    assert load.shape == (1, 8)
    assert load.max().item() == pytest.approx(stats["load_max_over_mean"].item())
    assert all(not v.requires_grad for v in stats.values())


def test_selection_bias_stays_float32_when_the_model_is_cast():
    """bf16-true training casts the module; the bias must keep taking small steps."""
    from arch.config import RouterConfig
    from experts.router import SoftmaxTopKRouter

    router = SoftmaxTopKRouter(16, 4, 2, RouterConfig(bias_update_rate=1e-3))
    with torch.no_grad():
        router.expert_bias.fill_(0.6)
    router = router.to(torch.bfloat16)
    assert router.gate.weight.dtype == torch.bfloat16 and router.expert_bias.dtype == torch.float32
    before = router.expert_bias.clone()
    router.update_bias(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    assert (router.expert_bias - before).abs().max().item() == pytest.approx(1e-3, rel=1e-4)
