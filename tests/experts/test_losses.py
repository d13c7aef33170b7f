"""Balancing losses against hand-computed values and Hugging Face's Qwen3-MoE."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from moe_helpers import D_MODEL, make_moe


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize("scope", ["micro", "global", "pooled"])
def test_uniform_router_aux_loss_is_top_k(router, scope):
    # zero router weights: every expert scores the same, so whatever top-k picks,
    # f sums to K and P_i = 1/E: E * sum_i f_i / E = K (Switch / HF convention)
    K, coef = 3, 0.01
    layer = make_moe(n_experts=6, top_k=K, router=router, aux_coef=coef, aux_scope=scope).train()
    torch.nn.init.zeros_(layer.router.gate.weight)
    layer(torch.randn(20, D_MODEL))
    aux = layer.gather_aux([layer])["aux_loss"]
    assert aux.item() == pytest.approx(coef * K, rel=1e-6)
    assert layer.stats["aux_loss"].item() == pytest.approx(K, rel=1e-6)
    assert layer.stats["entropy"].item() == pytest.approx(math.log(6), rel=1e-6)


def _one_hot_inputs(rows):
    x = torch.zeros(len(rows), D_MODEL)
    for t, (i, scale) in enumerate(rows):
        x[t, i] = scale
    return x


def test_switch_loss_by_hand():
    # three token kinds with fixed logits; E = 3, K = 1
    logits_by_kind = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.3, 0.0, 0.9]]
    layer = make_moe(n_experts=3, top_k=1, aux_coef=1.0).train()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        for i, logits in enumerate(logits_by_kind):
            layer.router.gate.weight[:, i] = torch.tensor(logits)
    kinds = [0, 1, 2, 0, 0]
    layer(_one_hot_inputs([(k, 1.0) for k in kinds]))

    def softmax(v):
        z = sum(math.exp(a) for a in v)
        return [math.exp(a) / z for a in v]

    probs = [softmax(logits_by_kind[k]) for k in kinds]
    choice = [max(range(3), key=lambda e: p[e]) for p in probs]  # 0, 1, 2, 0, 0
    f = [choice.count(e) / len(kinds) for e in range(3)]
    P = [sum(p[e] for p in probs) / len(kinds) for e in range(3)]
    expected = 3 * sum(fe * pe for fe, pe in zip(f, P))
    assert layer.aux["aux_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_by_hand():
    # logits of expert e = scale * log(e + 1): logsumexp = log(sum_e (e + 1)^scale)
    E, z_coef = 6, 0.002
    layer = make_moe(n_experts=E, top_k=2, z_coef=z_coef).train()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, 0] = torch.log(torch.arange(1.0, E + 1))
    layer(_one_hot_inputs([(0, 1.0), (0, 2.0)]))
    expected = (math.log(21) ** 2 + math.log(91) ** 2) / 2  # 1+..+6 = 21, 1+4+..+36 = 91
    assert layer.aux["z_loss"].item() == pytest.approx(z_coef * expected, rel=1e-6)
    assert layer.stats["z_loss"].item() == pytest.approx(expected, rel=1e-6)


def _router_logits(model, ids):
    """Run the model and return (its output, each MoE layer's router logits)."""
    logits = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: logits.append(out.logits_TE))
             for m in model.moe_layers]
    try:
        out = model(ids)
    finally:
        for h in hooks:
            h.remove()
    return out, logits


def _switch_by_hand(logits_list, E, K):
    """f and P over the concatenation of the given layers' tokens."""
    logits = torch.cat(logits_list).double()
    probs = logits.softmax(-1)
    ids = probs.topk(K, dim=-1).indices
    f = torch.stack([(ids == e).sum() for e in range(E)]).double() / logits.shape[0]
    return (E * (f * probs.mean(0)).sum()).item()


def test_pooled_scope_equals_concatenated_layers_and_hugging_face():
    coef = 0.001
    model = tiny_model("qwen3_moe", "model.n_layers=3", "model.moe.balance.aux_scope=pooled",
                       f"model.moe.balance.aux_coef={coef}").train()
    with torch.no_grad():  # spread the routers so the loss is far from its minimum
        for m in model.moe_layers:
            m.router.gate.weight.normal_(std=0.3)
    ids = torch.randint(0, 256, (2, 16))
    out, logits = _router_logits(model, ids)
    E, K = model.cfg.moe.n_experts, model.cfg.moe.top_k
    assert len(logits) == 3
    assert out.aux["aux_loss"].item() == pytest.approx(coef * _switch_by_hand(logits, E, K), rel=1e-5)
    hf = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    ref = hf.load_balancing_loss_func(tuple(logits), E, K)
    assert out.aux["aux_loss"].item() == pytest.approx(coef * ref.item(), rel=1e-5)


def test_micro_scope_sums_layers_and_z_loss_sums_layers():
    model = tiny_model("qwen3_moe", "model.n_layers=3", "model.moe.balance.aux_scope=micro",
                       "model.moe.balance.aux_coef=0.01", "model.moe.balance.z_coef=0.001").train()
    ids = torch.randint(0, 256, (2, 16))
    out, logits = _router_logits(model, ids)
    E, K = model.cfg.moe.n_experts, model.cfg.moe.top_k
    per_layer = sum(_switch_by_hand([lg], E, K) for lg in logits)
    assert out.aux["aux_loss"].item() == pytest.approx(0.01 * per_layer, rel=1e-5)
    z = sum(torch.logsumexp(lg.double(), -1).pow(2).mean().item() for lg in logits)
    assert out.aux["z_loss"].item() == pytest.approx(0.001 * z, rel=1e-5)


def test_global_scope_in_one_process_is_the_micro_loss():
    ids = torch.randint(0, 256, (2, 16))
    outs = {}
    for scope in ("micro", "global"):
        model = tiny_model("qwen3_moe", f"model.moe.balance.aux_scope={scope}",
                           "model.moe.balance.aux_coef=0.01").train()
        outs[scope] = model(ids).aux["aux_loss"]
    assert outs["global"].item() == pytest.approx(outs["micro"].item(), rel=1e-6)


def test_losses_off_when_their_coefficient_is_zero():
    model = tiny_model("qwen3_moe", "model.moe.balance.aux_coef=0", "model.moe.balance.z_coef=0").train()
    assert model(torch.randint(0, 256, (1, 8))).aux == {}


def test_router_weights_renormalise_scale_and_jitter():
    x = torch.randn(10, D_MODEL)
    layer = make_moe(top_k=3, renormalize=True)
    torch.testing.assert_close(layer.router(x).weights_TK.sum(-1), torch.ones(10))
    raw = make_moe(top_k=3, renormalize=False).router(x)
    torch.testing.assert_close(raw.weights_TK, raw.scores_TE.gather(-1, raw.ids_TK))
    layer.router.route_scale = 2.5
    torch.testing.assert_close(layer.router(x).weights_TK.sum(-1), torch.full((10,), 2.5))
    layer.router.jitter = 0.5
    layer.train()
    assert not torch.equal(layer.router(x).logits_TE, layer.router(x).logits_TE)
    layer.eval()
    assert torch.equal(layer.router(x).logits_TE, layer.router(x).logits_TE)
