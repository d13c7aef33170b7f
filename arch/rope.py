"""Rotary position embedding (rotate-half convention), one instance per layer kind.

Scalings (`RopeConfig.scaling`):
    none     inv_freq_i = theta^(-2i/d)
    linear   positions divided by `factor` (positional interpolation)
    yarn     YaRN: each frequency is interpolated (divided by `factor`) if it turns
             fewer than `beta_slow` times over `original_max_seq_len` positions, kept
             (extrapolated) if more than `beta_fast` times, and ramped linearly in
             between; cos and sin are multiplied by the attention factor
             (0.1 ln(factor) + 1, or DeepSeek's mscale / mscale_all_dim ratio of it)
`partial` < 1 rotates only the first partial x head_dim dimensions of each head; with
`proportional` (Gemma 4) the tables span the whole head instead: the first
partial x head_dim / 2 frequencies are theta^(-2i/head_dim), the rest 0 (cos 1, sin 0:
those pairs pass through), so pairs (i, i + head_dim / 2) rotate.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from .config import RopeConfig


def rotary_dim(head_dim: int, cfg: RopeConfig) -> int:
    """How many leading dimensions of a head the cos / sin tables cover."""
    return head_dim if cfg.proportional else int(head_dim * cfg.partial)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(cfg: RopeConfig) -> float:
    """The factor YaRN multiplies cos and sin by."""
    if cfg.attention_factor is not None:
        return cfg.attention_factor
    if cfg.mscale and cfg.mscale_all_dim:
        return _yarn_mscale(cfg.factor, cfg.mscale) / _yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    return _yarn_mscale(cfg.factor)


def inv_frequencies(dim: int, cfg: RopeConfig, device=None) -> torch.Tensor:
    """(dim / 2,) float32 inverse frequencies of a `dim`-dimensional rotation."""
    if cfg.proportional:  # `dim` is the whole head: int(partial x dim / 2) pairs turn
        angles = int(cfg.partial * dim // 2)
        exponent = torch.arange(0, 2 * angles, 2, device=device, dtype=torch.int64).float()
        turning = 1.0 / cfg.theta ** (exponent / dim)
        return torch.cat((turning, torch.zeros(dim // 2 - angles, device=device)))
    exponent = torch.arange(0, dim, 2, device=device, dtype=torch.int64).float()
    pos_freqs = cfg.theta ** (exponent / dim)
    if cfg.scaling != "yarn":
        return 1.0 / pos_freqs

    def turns_dim(turns: float) -> float:  # the dimension whose frequency makes `turns` turns
        return dim * math.log(cfg.original_max_seq_len / (turns * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = turns_dim(cfg.beta_fast), turns_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the frequency as trained), 0: interpolate
    return (1.0 / (cfg.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


class RoPE(nn.Module):
    """Produces (cos, sin) of shape (T, rotary_dim) in float32 for positions
    start..start+T-1 (start > 0: the new tokens of a decoding step).

    No buffers: tables are recomputed per forward (cheap, and meta-init friendly).
    """

    def __init__(self, head_dim: int, cfg: RopeConfig):
        super().__init__()
        self.head_dim = head_dim
        self.dim = rotary_dim(head_dim, cfg)
        self.cfg = cfg
        self.theta = cfg.theta
        self.factor = cfg.factor if cfg.scaling == "linear" else 1.0
        self.scale = yarn_attention_factor(cfg) if cfg.scaling == "yarn" else 1.0

    def forward(self, seq_len: int, device: torch.device, start: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        inv_freq = inv_frequencies(self.dim, self.cfg, device)
        pos = torch.arange(start, start + seq_len, device=device, dtype=torch.float32) / self.factor
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.scale == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * self.scale, emb.sin() * self.scale

    def at(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of shape (B, 1, T, rotary_dim) for per-token positions (B, T)
        (documents restarting at 0 in a packed sequence: arch/documents.py); each entry
        is the one `forward` gives for that position."""
        inv_freq = inv_frequencies(self.dim, self.cfg, positions.device)
        freqs = (positions.to(torch.float32) / self.factor)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        if self.scale == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * self.scale, emb.sin() * self.scale

    def extra_repr(self) -> str:
        extra = f", rotary_dim={self.dim}" if self.dim != self.head_dim else ""
        if self.cfg.scaling == "yarn":
            extra += f", yarn x{self.cfg.factor:g} from {self.cfg.original_max_seq_len}"
        return f"head_dim={self.head_dim}, theta={self.theta:g}, factor={self.factor:g}{extra}"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, R) (or (B, 1, T, R): per-sequence positions)
    float32 with R <= D, cast to x's dtype as HF
    does. The first R dimensions rotate; the rest pass through."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :R], cos, sin), x[..., R:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
