"""Dense feed-forward networks. The experts reuse `GLU`, `ACTIVATIONS` and `GATED`."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .registry import FFN


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# gpt-oss's clamped SwiGLU: its fixed constants (transformers' swiglu_alpha / swiglu_limit)
SWIGLU_CLAMPED_ALPHA, SWIGLU_CLAMPED_LIMIT = 1.702, 7.0


def swiglu_clamped(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gpt-oss: (clamp(up, -L, L) + 1) * g * sigmoid(alpha * g), g = min(gate, L)."""
    gate = gate.clamp(max=SWIGLU_CLAMPED_LIMIT)
    up = up.clamp(min=-SWIGLU_CLAMPED_LIMIT, max=SWIGLU_CLAMPED_LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * SWIGLU_CLAMPED_ALPHA))


ACTIVATIONS = {"swiglu": F.silu, "geglu": gelu_tanh, "gelu": F.gelu}
# gated kinds: how the gate and up halves combine
GLU = {"swiglu": lambda g, u: F.silu(g) * u, "geglu": lambda g, u: gelu_tanh(g) * u,
       "swiglu_clamped": swiglu_clamped}
GATED = {"swiglu": True, "geglu": True, "gelu": False, "swiglu_clamped": True}


class GatedMLP(nn.Module):
    """down(glu(gate(x), up(x))): SwiGLU with silu, GeGLU with tanh-GELU, gpt-oss's
    clamped SwiGLU."""

    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool = False):
        super().__init__()
        self.glu = GLU[kind]
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.glu(self.gate_proj(x), self.up_proj(x)))


class MLP(nn.Module):
    """down(act(up(x))): the plain two-matrix FFN."""

    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[kind]
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


# swiglu/geglu/gelu/swiglu_clamped -> a constructor taking (d_model, d_ff, bias=False)
for _kind in GATED:
    FFN.register(_kind)(partial(GatedMLP if GATED[_kind] else MLP, kind=_kind))


def ffn_params(d_model: int, d_ff: int, kind: str, bias: bool = False) -> int:
    """Parameter count of one dense FFN of this kind (used by the accounting)."""
    n_in = 2 if GATED[kind] else 1
    return (n_in + 1) * d_model * d_ff + bias * (n_in * d_ff + d_model)
