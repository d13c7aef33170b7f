"""The MoE layer: router -> permute -> expert backend -> unpermute (+ shared experts)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from arch.config import MoEConfig
from arch.ffn import GATED
from arch.registry import EXPERT_BACKEND, FFN, MOE, ROUTER


@MOE.register("moe")
class MoE(nn.Module):
    """Top-k routed experts with stacked weights, optional shared experts.

    After each forward `self.aux` holds this layer's weighted balancing losses and
    `self.last` the routing facts the losses and statistics need.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, F_ = cfg.n_experts, cfg.d_expert
        self.n_experts, self.top_k = E, cfg.top_k
        self.router = ROUTER.get(cfg.router.kind, "model.moe.router.kind")(d_model, E, cfg.top_k, cfg.router)
        n_in = 2 if GATED[cfg.expert_ffn] else 1
        self.w_in = nn.Parameter(torch.empty(E, n_in * F_, d_model))  # [gate; up] per expert
        self.w_out = nn.Parameter(torch.empty(E, d_model, F_))
        self.backend = EXPERT_BACKEND.get(cfg.backend, "model.moe.backend")
        self.shared = None
        self.shared_gate = None
        if cfg.n_shared_experts > 0:
            d_shared = cfg.n_shared_experts * cfg.d_shared
            self.shared = FFN.get(cfg.expert_ffn)(d_model, d_shared)
            if cfg.shared_gate:
                self.shared_gate = nn.Linear(d_model, 1, bias=False)
        self.aux: Dict[str, torch.Tensor] = {}
        self.last: Dict[str, torch.Tensor] = {}
        self.init_weights(0.02, 0.02)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)
        self.router.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T, K, E = x_TD.shape[0], self.top_k, self.n_experts
        r = self.router(x_TD)

        # permute: slots sorted by expert; a stable sort keeps token order within an expert
        ids_S = r.ids_TK.flatten()
        order_S = ids_S.argsort(stable=True)
        token_S = order_S // K
        counts_E = torch.bincount(ids_S, minlength=E)
        y_SD = self.backend(x_TD[token_S], counts_E, self.w_in, self.w_out, self.cfg.expert_ffn)

        # unpermute: weight each slot and add it back to its token
        w_S = r.weights_TK.flatten()[order_S].to(y_SD.dtype)
        y_TD = torch.zeros(T, shape[-1], dtype=y_SD.dtype, device=x.device)
        y_TD.index_add_(0, token_S, y_SD * w_S[:, None])
        y_TD = y_TD.to(x.dtype)

        if self.shared is not None:
            s = self.shared(x_TD)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x_TD)) * s
            y_TD = y_TD + s

        self.last = {"counts_E": counts_E.detach(), "probs_E": r.scores_TE.mean(0), "n_tokens": T}
        self.aux = self._losses(r, counts_E, T)
        return y_TD.view(shape)

    def _losses(self, r, counts_E: torch.Tensor, T: int) -> Dict[str, torch.Tensor]:
        b = self.cfg.balance
        aux = {}
        if b.aux_coef > 0 and b.aux_scope == "micro":
            # Switch / HF convention: f_i = share of tokens choosing i (sums to K), so a
            # perfectly uniform router gives loss = K.
            f_E = counts_E.float() / T
            aux["aux_loss"] = b.aux_coef * self.n_experts * (f_E * r.scores_TE.mean(0)).sum()
        if b.z_coef > 0:
            aux["z_loss"] = b.z_coef * torch.logsumexp(r.logits_TE, dim=-1).pow(2).mean()
        return aux

    @staticmethod
    def gather_aux(layers: List["MoE"]) -> Dict[str, torch.Tensor]:
        """Sum each named loss over layers; the pooled scope is computed here, over
        the router outputs of all layers together (Hugging Face Qwen3-MoE)."""
        out: Dict[str, torch.Tensor] = {}
        for layer in layers:
            for name, value in layer.aux.items():
                out[name] = out[name] + value if name in out else value
        b = layers[0].cfg.balance
        if b.aux_coef > 0 and b.aux_scope == "pooled":
            n_tok = sum(layer.last["n_tokens"] for layer in layers)
            f_E = sum(layer.last["counts_E"].float() for layer in layers) / n_tok
            p_E = sum(layer.last["probs_E"] * layer.last["n_tokens"] for layer in layers) / n_tok
            out["aux_loss"] = b.aux_coef * layers[0].n_experts * (f_E * p_E).sum()
        return out
