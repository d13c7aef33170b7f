"""Gemma 4's MoE layer: the dense FFN and the routed experts side by side, summed.

    x ──> dense_norm ──> dense FFN (model.ffn) ──> dense_post_norm ──┐
      ├─> experts_norm ──> routed experts ──> experts_post_norm ────+──> out
      └─> router (reads x itself: normed_softmax_topk normalises it)

The block's own pre-FFN norm is left out (arch/block.py): the two branches normalise x
each with a norm of their own; the block's post-FFN norm applies to the sum.
"""
from __future__ import annotations

import torch
from torch import nn

from arch.config import MoEConfig, ModelConfig, RouterConfig
from arch.norm import build_norm, rms_normalize
from arch.registry import FFN, MOE, ROUTER

from .moe import MoE
from .router import Routing, SoftmaxTopKRouter


@MOE.register("parallel_dense")
class ParallelDenseMoE(MoE):
    """`moe` layer (router, dispatch, experts, losses and statistics as there) plus a
    dense FFN beside it, and the four norms around the two branches."""

    takes_model_config = True  # arch.block.build_ffn passes the model config and d_ff

    def __init__(self, d_model: int, cfg: MoEConfig, model: ModelConfig, d_ff: int):
        super().__init__(d_model, cfg)
        self.dense_norm = build_norm(d_model, model.norm)
        self.dense = FFN.get(model.ffn.kind, "model.ffn.kind")(d_model, d_ff, bias=model.ffn.bias)
        self.dense_post_norm = build_norm(d_model, model.norm)
        self.experts_norm = build_norm(d_model, model.norm)
        self.experts_post_norm = build_norm(d_model, model.norm)
        if hasattr(self.router, "eps"):  # the router's own norm takes the model's epsilon
            self.router.eps = model.norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.dense_post_norm(self.dense(self.dense_norm(x)))
        return dense + self.experts_post_norm(super().forward(self.experts_norm(x), router_x=x))


@ROUTER.register("normed_softmax_topk")
class NormedSoftmaxTopKRouter(SoftmaxTopKRouter):
    """Gemma 4: softmax top-k (renormalised as `renormalize` says) of
    gate(rms_normalize(x) * scale / sqrt(d_model)), the kept weights then multiplied
    by a learned per-expert scale. All in float32."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, cfg: RouterConfig):
        super().__init__(d_model, n_experts, top_k, cfg)
        self.eps = 1e-6  # ParallelDenseMoE sets the model's
        self.root = d_model ** -0.5
        self.scale = nn.Parameter(torch.ones(d_model))
        self.per_expert_scale = nn.Parameter(torch.ones(n_experts))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.ones_(self.scale)
        nn.init.ones_(self.per_expert_scale)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):
            x = rms_normalize(x_TD.float(), self.eps) * self.scale.float() * self.root
        r = super().forward(x)
        return r._replace(weights_TK=r.weights_TK * self.per_expert_scale.float()[r.ids_TK])
