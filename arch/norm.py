"""RMSNorm in both flavours the reference models use."""
from __future__ import annotations

import torch
from torch import nn

from .config import NormConfig
from .registry import NORM


@NORM.register("rmsnorm")
class RMSNorm(nn.Module):
    """y = x / rms(x) * w, statistics in float32 whatever the input dtype.

    zero_centered (Gemma): the weight starts at 0 and is applied as (1 + w).
    weight_in_float32 (Gemma): multiply in float32, cast once at the end; otherwise
    (Qwen/Llama) cast the normalised x back to the input dtype, then multiply.
    """

    def __init__(self, dim: int, cfg: NormConfig):
        super().__init__()
        self.eps = cfg.eps
        self.zero_centered = cfg.zero_centered
        self.weight_in_float32 = cfg.weight_in_float32
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.zero_centered else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float32:
            w = self.weight.float()
            return (xf * (1.0 + w if self.zero_centered else w)).to(dtype)
        w = self.weight
        return (1.0 + w if self.zero_centered else w) * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, zero_centered={self.zero_centered}"


def build_norm(dim: int, cfg: NormConfig) -> nn.Module:
    return NORM.get(cfg.kind, "model.norm.kind")(dim, cfg)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, in float32, cast back: an RMSNorm without a
    weight (Gemma 4's value norm and router norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
