"""The MoE layer: router -> dispatch (permute) -> expert backend -> combine
(unpermute) -> + shared experts. Balancing losses and router statistics are
recorded on the layer at each forward; the counts that outlive a forward (global
counts, bias loads) are the layer's `balance` (experts/balance.py), driven by the
training loop through experts/layers.py.

Balancing scopes (model.moe.balance.aux_scope), all with the Switch form
E * sum_i f_i P_i of experts/losses.py, weighted by aux_coef:
  micro   per layer, f and P over this micro-batch's tokens on this rank; summed
          over layers.
  pooled  one loss over the tokens of all layers together (Hugging Face Qwen3-MoE's
          load_balancing_loss_func); computed in `MoE.gather_aux`.
  global  per layer, f over the whole optimizer-step batch (all data-parallel ranks
          and all accumulation micro-batches), P over this micro-batch's tokens
          (Qwen's global-batch loss). With equal micro-batches, the mean of these
          losses over ranks and micro-batches (what DDP and gradient accumulation
          take) is E * sum_i f_i^G P_i^G, so the loss and its gradients do not depend
          on how the batch is split. f^G comes from one all-reduce of every layer's
          counts after the forward's last layer (`gather_aux`; grad_accum = 1) or
          from experts.layers.precompute_global_counts.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from arch.config import MoEConfig
from arch.ffn import GATED
from arch.quant import read_weight
from arch.registry import EXPERT_BACKEND, FFN, MOE, ROUTER

from .balance import BalanceState, count_row, sum_rows
from .dispatch import Dispatch, dispatch, expert_capacity, routed_experts
from .losses import router_entropy, switch_loss, z_loss
from .router import Routing


@MOE.register("moe")
class MoE(nn.Module):
    """Top-k routed experts with stacked weights (w_in_EID = [gate; up] per expert,
    w_out_EDF), optional shared experts that every token passes through.

    After each forward: `aux` holds this layer's weighted balancing losses (keys
    "aux_loss", "z_loss", present when their coefficient is > 0) and `stats` its
    detached router statistics (experts/stats.py reads them). `balance` holds the
    counts kept between forwards (experts/balance.py). `backend` computes the
    experts' rows: the registered backend, or under expert parallelism that backend
    wrapped in the all-to-all exchange (experts.layers.shard_experts). A backend
    with a `fused` entry (triton) takes the token rows and the dispatch and returns
    the combined y_TD: it replaces permute -> backend -> combine.
    """

    # the stacked weights quantization-aware training fake-quantizes (arch/quant.py)
    expert_weight_names = ("w_in", "w_out")

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, F_ = cfg.n_experts, cfg.d_expert
        self.n_experts, self.top_k = E, cfg.top_k
        self.router = ROUTER.get(cfg.router.kind, "model.moe.router.kind")(d_model, E, cfg.top_k, cfg.router)
        n_in = 2 if GATED[cfg.expert_ffn] else 1
        self.w_in = nn.Parameter(torch.empty(E, n_in * F_, d_model))  # [gate; up] per expert
        self.w_out = nn.Parameter(torch.empty(E, d_model, F_))
        self.b_in = nn.Parameter(torch.empty(E, n_in * F_)) if cfg.expert_bias else None
        self.b_out = nn.Parameter(torch.empty(E, d_model)) if cfg.expert_bias else None
        self.backend = EXPERT_BACKEND.get(cfg.backend, "model.moe.backend")
        self.shared = None
        self.shared_gate = None
        if cfg.n_shared_experts > 0:
            # n shared experts of width d_shared, each with weight 1, are one FFN of
            # width n * d_shared: same function, same parameter count, one matmul
            self.shared = FFN.get(cfg.expert_ffn)(d_model, cfg.n_shared_experts * cfg.d_shared)
            if cfg.shared_gate:
                self.shared_gate = nn.Linear(d_model, 1, bias=False)

        self.balance = BalanceState(E)
        self.balance.running = cfg.balance.global_counts == "running"
        # False: dropless whatever capacity_factor says. Capacity applies in eval as in
        # training, with C growing with the tokens of one forward; generation
        # (arch/generate.py) turns it off, so that a token's output does not depend on
        # how its sequence was cut into forwards (prompt chunks, one-token steps)
        self.apply_capacity = True
        self.track_stats = True
        self.aux: Dict[str, torch.Tensor] = {}
        self.stats: Dict[str, torch.Tensor] = {}
        self._pooled = None  # (counts_E, probs_E, T) for the pooled scope, read by gather_aux
        # (counts_E, T, probs_E) of a training forward in the global scope, whose counts
        # gather_aux sums over the ranks with every other layer's
        self._global = None
        self.init_weights(0.02, 0.02)

    def extra_repr(self) -> str:
        cap = "dropless" if self.cfg.capacity_factor is None else f"capacity_factor={self.cfg.capacity_factor}"
        return (f"experts={self.n_experts}, top_k={self.top_k}, d_expert={self.cfg.d_expert}, "
                f"backend={self.cfg.backend}, {cap}")

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)
        self.router.expert_bias.zero_()
        self.balance.reset()  # counts of the old weights mean nothing for the new ones

    def forward(self, x: torch.Tensor, router_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`router_x`: what the router reads, when not the experts' input `x` (Gemma 4's
        router reads the block's input, its experts a normalised copy)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        r = self.router(x_TD if router_x is None else router_x.reshape(-1, shape[-1]))
        cf = self.cfg.capacity_factor if self.apply_capacity else None
        d = dispatch(r.ids_TK, self.n_experts, None if cf is None else expert_capacity(T, self.top_k, self.n_experts, cf))
        biases = () if self.b_in is None else (self.b_in, self.b_out)
        w_in, w_out = self.expert_weights()  # fake-quantized under QAT (arch/quant.py)
        fused = getattr(self.backend, "fused", None)
        if fused is not None:  # the backend gathers the token rows and combines them itself
            y_TD = fused(x_TD, r.weights_TK, d, w_in, w_out, self.cfg.expert_ffn, *biases).to(x.dtype)
        else:
            y_TD = routed_experts(self.backend, x_TD, r.weights_TK, d, w_in, w_out, self.cfg.expert_ffn,
                                  *biases).to(x.dtype)
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        self._record(r, d, T)
        return y_TD.view(shape)

    def expert_weights(self):
        """(w_in, w_out) as every backend must compute with them: fake-quantized when
        quantization-aware training gave this layer a quantizer (arch/quant.py), so a
        backend never needs to know about QAT."""
        return read_weight(self, "w_in"), read_weight(self, "w_out")

    # ------------------------------------------------------------ losses, stats

    def _record(self, r: Routing, d: Dispatch, T: int) -> None:
        """Losses, statistics and load counts of this forward. Reads nothing on the
        host and starts no collective: a training forward's global-scope counts wait
        for gather_aux, which sums every layer's at once."""
        counts_E = d.tokens_per_expert_E  # selections, before capacity: what f counts
        if self.balance.counting:  # precompute_global_counts: counts only
            self.balance.count(counts_E, T)
            self.aux, self._pooled, self._global = {}, None, None
            return
        if self.training and self.router.bias_update_rate > 0:
            self.balance.record_selections(counts_E)

        b = self.cfg.balance
        probs_E = r.probs_TE.mean(0)
        aux: Dict[str, torch.Tensor] = {}
        self._pooled = self._global = None
        if b.aux_coef > 0:
            if b.aux_scope == "micro":
                aux["aux_loss"] = b.aux_coef * switch_loss(counts_E, T, probs_E)
            elif b.aux_scope == "global" and self.balance.needs_sum(self.training):
                # summed over the ranks with every other layer's in gather_aux: one
                # collective per forward, after the last layer, none inside a block
                self._global = (counts_E, T, probs_E)
            elif b.aux_scope == "global":  # precomputed step counts, a re-run, or evaluation
                counts_G, tokens_G = self.balance.step_counts(counts_E, T, self.training)
                aux["aux_loss"] = b.aux_coef * switch_loss(counts_G, tokens_G, probs_E)
            else:  # pooled: gather_aux forms the loss over all layers
                self._pooled = (counts_E, probs_E, T)
        z = None
        if b.z_coef > 0:
            z = z_loss(r.logits_TE)
            aux["z_loss"] = b.z_coef * z
        self.aux = aux

        if self.track_stats:
            with torch.no_grad():
                self.stats = {
                    "tokens_per_expert": counts_E,
                    "load_max_over_mean": counts_E.max() / counts_E.float().mean(),
                    "dropped_tokens": d.n_dropped,
                    "entropy": router_entropy(r.probs_TE),
                    "aux_loss": switch_loss(counts_E, T, probs_E.detach()),
                    "z_loss": z.detach() if z is not None else z_loss(r.logits_TE),
                    "bias_norm": self.router.expert_bias.float().norm(),
                }

    @staticmethod
    def gather_aux(layers: List["MoE"]) -> Dict[str, torch.Tensor]:
        """Sum each named loss over layers; the pooled scope is formed here, over the
        router outputs of all layers together (Hugging Face Qwen3-MoE), and so is the
        global scope's loss of a training forward, from every layer's counts summed
        over the ranks in one all-reduce (experts/balance.py)."""
        pending = [layer for layer in layers if layer._global is not None]
        if pending:
            summed = sum_rows([layer.balance for layer in pending],
                              [count_row(counts_E, T) for counts_E, T, _ in (layer._global for layer in pending)])
            for layer, (counts_G, tokens_G) in zip(pending, summed):
                probs_E, layer._global = layer._global[2], None
                layer.aux = {"aux_loss": layer.cfg.balance.aux_coef * switch_loss(counts_G, tokens_G, probs_E),
                             **layer.aux}
        out: Dict[str, torch.Tensor] = {}
        for layer in layers:
            for name, value in layer.aux.items():
                out[name] = out[name] + value if name in out else value
        pooled = [layer._pooled for layer in layers if layer._pooled is not None]
        if pooled:
            n = sum(T for _, _, T in pooled)
            counts_E = sum(c for c, _, _ in pooled)
            probs_E = sum(p * T for _, p, T in pooled) / n
            out["aux_loss"] = layers[0].cfg.balance.aux_coef * switch_loss(counts_E, n, probs_E)
        return out
