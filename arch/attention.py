"""Multi-head attention with grouped KV heads (MHA / GQA / MQA).

Every variant is a field, not a class: QK-norm, explicit head_dim, a softmax scale
from query_pre_attn_scalar, a sliding window, tanh soft-capping of the logits.

A sliding-window layer with window W lets query i see keys j with i - W < j <= i:

    W = 3      keys ->
    q0  x . . . .
    q1  x x . . .
    q2  x x x . .
    q3  . x x x .
    q4  . . x x x
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import AttentionConfig, NormConfig
from .norm import build_norm
from .registry import ATTENTION
from .rope import apply_rope


def causal_mask(T: int, window: Optional[int], device) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend to key j."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed


def eager_attention(q, k, v, scale: float, window: Optional[int], softcap: Optional[float]):
    """The obviously correct path: explicit scores, float32 softmax. q: (B,H,T,D)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = causal_mask(q.shape[2], window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return probs @ v


def sdpa_attention(q, k, v, scale: float, window: Optional[int]):
    if window is None or window >= q.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    mask = causal_mask(q.shape[2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@ATTENTION.register("gqa")
class Attention(nn.Module):
    """Head counts are read from tensor shapes in forward, so sharding the projections
    over heads never needs a mutated config."""

    def __init__(self, d_model: int, cfg: AttentionConfig, norm: NormConfig, window: Optional[int]):
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.window = window
        self.softcap = cfg.softcap
        self.impl = cfg.impl
        self.scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
        self.q_proj = nn.Linear(d_model, cfg.n_heads * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d_model, bias=cfg.bias)
        self.q_norm = build_norm(hd, norm) if cfg.qk_norm else nn.Identity()
        self.k_norm = build_norm(hd, norm) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.impl == "eager" or self.softcap is not None:
            y = eager_attention(q, k, v, self.scale, self.window, self.softcap)
        else:
            y = sdpa_attention(q, k, v, self.scale, self.window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, window={self.window}, scale={self.scale:.5g}"


