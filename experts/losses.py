"""Load-balancing losses, as plain functions of routing facts (unweighted).

    switch_loss = E * sum_i f_i * P_i
        f_i = (slots routed to expert i) / (tokens)   -- sums to K over experts
        P_i = mean over the same tokens' router probabilities of expert i
    A perfectly uniform router gives f_i = K / E, P_i = 1 / E, so switch_loss = K
    (the Switch Transformer / Hugging Face convention with top-k counting).
    The scopes differ only in which tokens f and P are taken over (see experts/moe.py).

    z_loss = mean over tokens of logsumexp(logits)^2      (ST-MoE router z-loss)
"""
from __future__ import annotations

from typing import Union

import torch


def switch_loss(counts_E: torch.Tensor, n_tokens: Union[int, torch.Tensor], probs_E: torch.Tensor) -> torch.Tensor:
    """E * sum_i (counts_i / n_tokens) * probs_i; differentiable in `probs_E` only."""
    f_E = counts_E.to(probs_E.dtype) / n_tokens
    return probs_E.numel() * (f_E * probs_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the routing distribution; log(E) is
    uniform, 0 is one expert per token."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
