"""Tiny MoE layers for the experts/ tests (float32, CPU)."""
from __future__ import annotations

import torch

import experts  # noqa: F401  (registers the MoE layer, routers, backends)
from arch.config import BalanceConfig, MoEConfig, RouterConfig
from experts.moe import MoE

D_MODEL = 16  # grouped_mm on CPU wants rows of a multiple of 16 bytes: 4 float32
# a tiny model's balancing as the expert-parallel tests use it: the global-batch loss and
# the aux-loss-free bias, both of which must survive any split of the batch
GLOBAL_BALANCE = ("model.moe.balance.aux_scope=global", "model.moe.balance.aux_coef=0.1",
                  "model.moe.router.bias_update_rate=0.01")


def moe_config(n_experts=6, top_k=2, d_expert=8, router="softmax_topk", renormalize=True,
               bias_update_rate=0.0, aux_coef=0.0, aux_scope="micro", z_coef=0.0,
               n_shared=0, d_shared=None, shared_gate=False, backend="grouped_mm",
               capacity_factor=None, expert_ffn="swiglu", expert_bias=False) -> MoEConfig:
    return MoEConfig(
        n_experts=n_experts, top_k=top_k, d_expert=d_expert, expert_ffn=expert_ffn, expert_bias=expert_bias,
        router=RouterConfig(kind=router, renormalize=renormalize, bias_update_rate=bias_update_rate),
        balance=BalanceConfig(aux_coef=aux_coef, aux_scope=aux_scope, z_coef=z_coef),
        n_shared_experts=n_shared, d_shared=d_shared or d_expert, shared_gate=shared_gate,
        backend=backend, capacity_factor=capacity_factor,
    )


def make_moe(seed=0, d_model=D_MODEL, router_std=0.5, **kw) -> MoE:
    """A layer with a router spread enough that top-k choices are not near-ties."""
    torch.manual_seed(seed)
    layer = MoE(d_model, moe_config(**kw))
    with torch.no_grad():
        layer.w_in.normal_(std=0.3)
        layer.w_out.normal_(std=0.3)
        layer.router.gate.weight.normal_(std=router_std)
        for b in (layer.b_in, layer.b_out):
            if b is not None:
                b.normal_(std=0.3)
        for p in ([] if layer.shared is None else list(layer.shared.parameters())):
            p.normal_(std=0.3)
        if layer.shared_gate is not None:
            layer.shared_gate.weight.normal_(std=0.3)
    return layer


def clone_with(layer: MoE, **kw) -> MoE:
    """The same weights in a layer built with some config fields changed."""
    cfg = layer.cfg
    fields = dict(n_experts=cfg.n_experts, top_k=cfg.top_k, d_expert=cfg.d_expert, router=cfg.router.kind,
                  renormalize=cfg.router.renormalize, bias_update_rate=cfg.router.bias_update_rate,
                  aux_coef=cfg.balance.aux_coef, aux_scope=cfg.balance.aux_scope, z_coef=cfg.balance.z_coef,
                  n_shared=cfg.n_shared_experts, d_shared=cfg.d_shared, shared_gate=cfg.shared_gate,
                  backend=cfg.backend, capacity_factor=cfg.capacity_factor, expert_ffn=cfg.expert_ffn,
                  expert_bias=cfg.expert_bias)
    fields.update(kw)
    other = MoE(layer.w_in.shape[-1], moe_config(**fields))
    other.load_state_dict(layer.state_dict())
    return other


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
