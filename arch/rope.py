"""Rotary position embedding (rotate-half convention), one instance per layer kind."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .config import RopeConfig


class RoPE(nn.Module):
    """Produces (cos, sin) of shape (T, head_dim) in float32 for positions 0..T-1.

    Linear scaling divides positions by `factor` (positional interpolation).
    No buffers: tables are recomputed per forward (cheap, and meta-init friendly).
    """

    def __init__(self, head_dim: int, cfg: RopeConfig):
        super().__init__()
        self.head_dim = head_dim
        self.theta = cfg.theta
        self.factor = cfg.factor if cfg.scaling == "linear" else 1.0

    def forward(self, seq_len: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.int64).float()
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        pos = torch.arange(seq_len, device=device, dtype=torch.float32) / self.factor
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}, factor={self.factor:g}"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) float32, cast to x's dtype as HF does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
