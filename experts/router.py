"""Routers: tokens -> (weights, expert ids, full scores), in float32 whatever the
autocast dtype. Shapes follow experts/__init__.py (T tokens, E experts, K top-k).

A new router is one subclass that defines `score` (and `probs` if its scores are not
already a distribution over experts) plus one registry line.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from arch.config import RouterConfig
from arch.quant import read_weight
from arch.registry import ROUTER


class Routing(NamedTuple):
    weights_TK: torch.Tensor  # float32 combine weights of the chosen experts
    ids_TK: torch.Tensor  # int64 expert ids, chosen with the balancing bias if any
    scores_TE: torch.Tensor  # float32 scores over all experts (softmax or sigmoid)
    probs_TE: torch.Tensor  # float32 scores as a distribution over experts (rows sum to 1)
    logits_TE: torch.Tensor  # float32 raw router logits (for the z-loss)


# Up to this many experts, top-k is taken from a sort of each row: inside a compiled
# block on an H200 that saved ~95 us per layer at 16K tokens x 128 experts (W2n: 43.18
# -> 42.42 ms a step), where torch.topk's radix selection is a kernel of its own. From
# 256 experts on, topk was faster (212 against 308 us at 256 experts, alone).
SORT_TOP_K_MAX_EXPERTS = 128


def top_k_ids(select_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of each row's k largest entries, largest first. Up to
    SORT_TOP_K_MAX_EXPERTS experts from a stable sort (ties: the lower id first),
    else torch.topk; the same experts either way, up to the order of ties."""
    if select_TE.shape[-1] <= SORT_TOP_K_MAX_EXPERTS:
        return select_TE.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return select_TE.topk(k, dim=-1).indices


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 operands, accumulated and returned in float32: one
    tensor-core matmul on CUDA; elsewhere (no such kernel) a float32 matmul of the
    same values, the same arithmetic."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _LowPrecisionLogits(torch.autograd.Function):
    """float32 logits x @ w.T of bf16 x and w (router.fast_logits).

    Forward: the products of bf16 values are exact in float32 and the matmul
    accumulates in float32, so this is the float32 matmul of the same values up to
    summation order. Backward: the float32 logit gradient g is split as hi + lo, both
    in the input dtype (hi = g rounded, lo = the remainder rounded, so hi + lo = g to
    about 2^-16 relative), and each gradient is the sum of two such matmuls, rounded
    once to the parameter's dtype: cheaper than three float32 matmuls (the W1 figures
    are in the README's Performance section)."""

    @staticmethod
    def forward(ctx, x_TD, w_ED):
        ctx.save_for_backward(x_TD, w_ED)
        return _mm_float32(x_TD, w_ED.t())

    @staticmethod
    def backward(ctx, g_TE):
        x_TD, w_ED = ctx.saved_tensors
        g_TE = g_TE.float()
        hi = g_TE.to(x_TD.dtype)
        lo = (g_TE - hi.float()).to(x_TD.dtype)
        # both gradients, always: in training the input and the weight both need them
        grad_x = (_mm_float32(hi, w_ED) + _mm_float32(lo, w_ED)).to(x_TD.dtype)
        grad_w = (_mm_float32(hi.t(), x_TD) + _mm_float32(lo.t(), x_TD)).to(w_ED.dtype)
        return grad_x, grad_w


class TopKRouter(nn.Module):
    """Linear scores -> top-k. Subclasses define `score` (logits -> scores).

    With `bias_update_rate > 0` a per-expert bias (a buffer, not a parameter) is added
    to the scores for *selection only* (auxiliary-loss-free balancing, DeepSeek-V3);
    the combine weights come from the unbiased scores.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, cfg: RouterConfig):
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.renormalize = cfg.renormalize
        self.jitter = cfg.jitter
        self.route_scale = cfg.scale
        self.bias_update_rate = cfg.bias_update_rate
        self.fast_logits = cfg.fast_logits
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.gate = nn.Linear(d_model, n_experts, bias=cfg.bias)
        # persistent: a resumed run must select experts exactly as before the checkpoint
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)

    def score(self, logits_TE: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probs(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Scores as a distribution over experts, for balancing losses and entropy."""
        return scores_TE

    def limit_to_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's group-limited routing: score each of the n_group groups of
        experts by the sum of its two best selection scores, keep the topk_group best
        groups and give every expert outside them -inf."""
        T, E = select_TE.shape
        grouped = select_TE.view(T, self.n_group, E // self.n_group)
        group_scores = grouped.topk(min(2, E // self.n_group), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)

    def weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        """The combine weights of the selected experts (before renormalising)."""
        return scores_TE.gather(-1, ids_TK)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        # Router math in float32 explicitly: top-k on bf16 scores ties and flips often.
        w = read_weight(self.gate)  # fake-quantized only when QAT lists the routers
        jitter = self.training and self.jitter > 0
        with torch.autocast(x_TD.device.type, enabled=False):
            if self.fast_logits and not jitter and x_TD.dtype == w.dtype == torch.bfloat16:
                # pure bf16: the values are bf16 already; float32 sums on tensor cores
                # (not fp16: its narrow range would flush the low half of small gradients)
                logits_TE = _LowPrecisionLogits.apply(x_TD, w)
                if self.gate.bias is not None:
                    logits_TE = logits_TE + self.gate.bias.float()
            else:
                x = x_TD.float()
                if jitter:  # Switch: multiplicative input noise
                    x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
                bias = None if self.gate.bias is None else self.gate.bias.float()
                logits_TE = F.linear(x, w.float(), bias)
            scores_TE = self.score(logits_TE)
            # the selection bias: learnt here when bias_update_rate > 0, or loaded (a
            # DeepSeek-V3 checkpoint's correction bias); zero otherwise
            select_TE = scores_TE.detach() + self.expert_bias.float()
            if self.n_group > 1:
                select_TE = self.limit_to_groups(select_TE)
            ids_TK = top_k_ids(select_TE, self.top_k)
            weights_TK = self.weights(scores_TE, ids_TK)
            if self.renormalize:
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
            if self.route_scale != 1.0:
                weights_TK = weights_TK * self.route_scale
        return Routing(weights_TK, ids_TK, scores_TE, self.probs(scores_TE), logits_TE)

    def _apply(self, fn, recurse=True):
        # Keep the selection bias in float32 whatever the module is cast to: its steps
        # (bias_update_rate, e.g. 1e-3) vanish in bf16 once |bias| > ~0.25. Device moves
        # still apply.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        moved = self._buffers["expert_bias"]
        if moved.dtype != torch.float32 and bias.dtype == torch.float32:
            self._buffers["expert_bias"] = bias.to(device=moved.device)
        return self

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free step: raise the bias of under-loaded experts, lower the
        over-loaded ones, by `bias_update_rate * sign(mean load - load)`.

        Called outside forward (experts.layers.update_router_biases, before the
        optimizer step) with loads already summed over the data-parallel group, so every
        rank applies the same update. Computed in float32; keep this buffer float32
        (bf16 cannot resolve small steps on a bias of order 1)."""
        if self.bias_update_rate <= 0:
            return
        load = tokens_per_expert_E.to(device=self.expert_bias.device, dtype=torch.float32)
        step = self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_bias.copy_(self.expert_bias.float() + step)


@ROUTER.register("softmax_topk")
class SoftmaxTopKRouter(TopKRouter):
    """Softmax over all experts, then top-k (Qwen3-MoE, Mixtral, Switch)."""

    def score(self, logits_TE):
        return logits_TE.softmax(dim=-1)


@ROUTER.register("topk_softmax")
class TopKSoftmaxRouter(TopKRouter):
    """Top-k of the logits, then a softmax over only those k (gpt-oss): the weights
    sum to 1 whatever `renormalize` says. The balancing losses see the softmax over
    all experts."""

    def score(self, logits_TE):
        return logits_TE

    def probs(self, scores_TE):
        return scores_TE.softmax(dim=-1)

    def weights(self, scores_TE, ids_TK):
        return scores_TE.gather(-1, ids_TK).softmax(dim=-1)


@ROUTER.register("sigmoid_topk")
class SigmoidTopKRouter(TopKRouter):
    """Independent sigmoid per expert, then top-k (DeepSeek-V3). The balancing
    losses see the scores normalised over experts, as DeepSeek-V3's sequence-wise
    loss does, so a uniform router gives the same loss as a uniform softmax."""

    def score(self, logits_TE):
        return logits_TE.sigmoid()

    def probs(self, scores_TE):
        return scores_TE / scores_TE.sum(-1, keepdim=True)
